//! Recording observations on PostgreSQL. What changes is decided by the
//! same code as on SQLite (the judging, refund and reconcile decisions of
//! `sqlite::record`, which hold no SQL); this file reads and writes the
//! rows, and locks each resource row it judges (`FOR UPDATE`) until the
//! transaction ends, so two replicas recording one resource are judged one
//! after the other and write one transition for one change.

use std::collections::{HashMap, HashSet};

use sqlx::PgConnection;

use crate::config::Config;
use crate::domain::alerts::Changes;
use crate::domain::observe::{Recorded, ToRecord, Trigger, Verdict};
use crate::providers::{knowledge, Observation, Target};
use crate::store::alerting::rules;
use crate::store::model::Resource;
use crate::store::sqlite::record::{
    decide, key_of, leaves_reconcile, new_transitions, reversal, runs, state_updates,
    what_was_recorded, RefundsAndProgress, Seen,
};
use crate::store::sqlite::resources::{ResourceKey, StateUpdate};
use crate::store::StoreError;
use crate::time::{self, Timestamp};

pub const RESOURCE_COLUMNS: &str =
    "rid, provider, kind, id, parent_id, status, terminal, livemode, context,
     amount, currency, snapshot, provider_updated_at, status_since, first_seen_at, last_observed_at,
     not_found, cancel_requested_at, next_reconcile_at, reconcile_failures";

const NO_SNAPSHOT: &str = "rid, provider, kind, id, parent_id, status, terminal, livemode, context,
     amount, currency, NULL::text AS snapshot, provider_updated_at, status_since, first_seen_at,
     last_observed_at, not_found, cancel_requested_at, next_reconcile_at, reconcile_failures";

/// Records many observations; those that share a resource in turn, each
/// seeing the one before (as on SQLite).
pub async fn record_all(
    conn: &mut PgConnection,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Vec<Recorded>, StoreError> {
    let mut recorded = Vec::with_capacity(items.len());
    for run in runs(items) {
        recorded.extend(record_run(conn, config, &items[run], now, changes).await?);
    }
    Ok(recorded)
}

/// Records one observation.
pub async fn record(
    conn: &mut PgConnection,
    config: &Config,
    obs: &Observation,
    trigger: &Trigger,
    context: Option<&str>,
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Recorded, StoreError> {
    let item = ToRecord {
        obs,
        trigger,
        context,
    };
    let mut recorded = record_all(conn, config, &[item], now, changes).await?;
    Ok(recorded.pop().unwrap_or_default())
}

async fn record_run(
    conn: &mut PgConnection,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Vec<Recorded>, StoreError> {
    let now_s = time::fmt(now);
    let seen = look_up(conn, config, items, &now_s).await?;
    let observed_before: Vec<i64> = seen
        .iter()
        .filter(|s| s.verdict != Verdict::Stale && s.current.status.is_some())
        .map(|s| s.current.rid)
        .collect();
    let refunds: HashMap<i64, String> = if observed_before.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (i64, String)>("SELECT rid, status FROM refunds WHERE rid = ANY($1)")
            .bind(&observed_before)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    };
    let decisions = decide(config, items, &seen, refunds, now, &now_s);
    if !decisions.stale.is_empty() {
        sqlx::query("UPDATE resources SET last_observed_at = $1 WHERE rid = ANY($2)")
            .bind(&now_s)
            .bind(&decisions.stale)
            .execute(&mut *conn)
            .await?;
    }
    let mut updated = Vec::with_capacity(decisions.fresh.len());
    for u in state_updates(items, &decisions.fresh, &now_s) {
        updated.extend(update_state(conn, &u).await?);
    }
    for s in &seen {
        add_aliases(conn, s.current.rid, s.obs.provider, &s.obs.kind, &s.aliases).await?;
    }
    write_side(conn, &decisions.side, &now_s).await?;
    let transitions = new_transitions(items, &decisions.fresh, &now_s);
    insert_transitions(conn, &transitions).await?;
    let (recorded, rows) =
        what_was_recorded(items, &seen, &decisions.fresh, &transitions, updated)?;
    let mut open = Vec::new();
    for r in &rows {
        open.extend(
            crate::store::alerting::AlertRows::open_alerts_about(
                &mut *conn,
                &r.provider,
                &r.kind,
                &r.id,
            )
            .await?,
        );
    }
    rules::on_observation_recorded(&mut *conn, config, &rows, &open, &now_s, changes).await?;
    Ok(recorded)
}

/// The observed resources, locked, each judged; then the children of the
/// fresh ones (an item stored under another of its keys is found by it).
async fn look_up<'a>(
    conn: &mut PgConnection,
    config: &Config,
    items: &[ToRecord<'a>],
    now_s: &str,
) -> Result<Vec<Seen<'a>>, StoreError> {
    let mut seen = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let current = lock_or_add(conn, &key_of(item.obs, item.context), now_s).await?;
        seen.push(Seen::judged(config, i, true, item.obs, current, false));
    }
    let mut listed: HashSet<(&str, &str)> = items
        .iter()
        .map(|i| (i.obs.kind.as_str(), i.obs.id.as_str()))
        .collect();
    let children: Vec<(usize, &'a Observation)> = seen
        .iter()
        .filter(|s| s.verdict != Verdict::Stale)
        .flat_map(|s| s.obs.children.iter().map(move |c| (s.item, c)))
        .filter(|(_, c)| listed.insert((c.kind.as_str(), c.id.as_str())))
        .collect();
    for (item, obs) in children {
        let key = key_of(obs, items[item].context);
        let mut aliases = Vec::new();
        let current = match lock(conn, obs.provider, &obs.kind, &obs.id).await? {
            Some(found) => found,
            None => {
                let others = knowledge::other_keys(obs);
                let keys: Vec<String> = std::iter::once(obs.id.clone())
                    .chain(others.clone())
                    .collect();
                let found = stored_under(conn, obs, &others).await?;
                let current = match found {
                    Some(found) => found,
                    None => lock_or_add(conn, &key, now_s).await?,
                };
                aliases = keys.into_iter().filter(|k| *k != current.id).collect();
                current
            }
        };
        let mut child = Seen::judged(config, item, false, obs, current, false);
        child.aliases = aliases;
        seen.push(child);
    }
    Ok(seen)
}

/// The resource of `key`, locked; added (without a status) when new.
async fn lock_or_add(
    conn: &mut PgConnection,
    key: &ResourceKey<'_>,
    now_s: &str,
) -> Result<Resource, StoreError> {
    if let Some(found) = lock(conn, key.provider, key.kind, key.id).await? {
        return Ok(found);
    }
    sqlx::query(
        "INSERT INTO resources (provider, kind, id, parent_id, context, first_seen_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id, provider, kind) DO NOTHING",
    )
    .bind(key.provider)
    .bind(key.kind)
    .bind(key.id)
    .bind(key.parent_id)
    .bind(key.context)
    .bind(now_s)
    .execute(&mut *conn)
    .await?;
    lock(conn, key.provider, key.kind, key.id)
        .await?
        .ok_or(StoreError::Invariant("a resource just added has no row"))
}

async fn lock(
    conn: &mut PgConnection,
    provider: &str,
    kind: &str,
    id: &str,
) -> Result<Option<Resource>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {NO_SNAPSHOT} FROM resources WHERE id = $1 AND provider = $2 AND kind = $3
         FOR UPDATE"
    ))
    .bind(id)
    .bind(provider)
    .bind(kind)
    .fetch_optional(&mut *conn)
    .await?)
}

/// An item stored under another of its keys: an alias of its id, or one
/// of its other keys as an id or an alias.
async fn stored_under(
    conn: &mut PgConnection,
    obs: &Observation,
    others: &[String],
) -> Result<Option<Resource>, StoreError> {
    let by_alias_sql = format!(
        "SELECT {NO_SNAPSHOT} FROM resources WHERE rid =
            (SELECT rid FROM resource_aliases WHERE alias = $1 AND provider = $2 AND kind = $3)
         FOR UPDATE"
    );
    let by_alias = |alias: String| {
        sqlx::query_as::<_, Resource>(&by_alias_sql)
            .bind(alias)
            .bind(obs.provider)
            .bind(obs.kind.clone())
    };
    if let Some(found) = by_alias(obs.id.clone()).fetch_optional(&mut *conn).await? {
        return Ok(Some(found));
    }
    for key in others {
        if let Some(found) = lock(conn, obs.provider, &obs.kind, key).await? {
            return Ok(Some(found));
        }
        if let Some(found) = by_alias(key.clone()).fetch_optional(&mut *conn).await? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The row as written; `None` when `u` is `only_if_changed` and would
/// change nothing (see `StateUpdate`).
async fn update_state(
    conn: &mut PgConnection,
    u: &StateUpdate<'_>,
) -> Result<Option<Resource>, StoreError> {
    let row = sqlx::query_as(&format!(
        "UPDATE resources SET
            parent_id = COALESCE($2, parent_id), status = $3, terminal = $4,
            livemode = COALESCE($5, livemode), context = COALESCE($6, context),
            amount = COALESCE($7, amount), currency = COALESCE($8, currency),
            snapshot = $9, provider_updated_at = COALESCE($10, provider_updated_at),
            status_since = $11, last_observed_at = $12, not_found = false,
            next_reconcile_at = $13, reconcile_failures = 0
         WHERE rid = $1 AND (NOT $14
            OR parent_id IS DISTINCT FROM COALESCE($2, parent_id) OR status IS DISTINCT FROM $3
            OR terminal IS DISTINCT FROM $4 OR livemode IS DISTINCT FROM COALESCE($5, livemode)
            OR context IS DISTINCT FROM COALESCE($6, context)
            OR amount IS DISTINCT FROM COALESCE($7, amount)
            OR currency IS DISTINCT FROM COALESCE($8, currency) OR snapshot IS DISTINCT FROM $9
            OR provider_updated_at IS DISTINCT FROM COALESCE($10, provider_updated_at)
            OR status_since IS DISTINCT FROM $11 OR not_found
            OR next_reconcile_at IS DISTINCT FROM $13 OR reconcile_failures <> 0)
         RETURNING {NO_SNAPSHOT}"
    ))
    .bind(u.rid)
    .bind(u.parent_id)
    .bind(u.status)
    .bind(u.terminal)
    .bind(u.livemode)
    .bind(u.context)
    .bind(u.amount)
    .bind(u.currency)
    .bind(u.snapshot)
    .bind(u.provider_updated_at)
    .bind(u.status_since)
    .bind(u.observed_at)
    .bind(u.next_reconcile_at)
    .bind(u.only_if_changed)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None if !u.only_if_changed => {
            Err(StoreError::Invariant("a resource being updated has no row"))
        }
        row => Ok(row),
    }
}

async fn add_aliases(
    conn: &mut PgConnection,
    rid: i64,
    provider: &str,
    kind: &str,
    aliases: &[String],
) -> Result<(), StoreError> {
    if aliases.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO resource_aliases (alias, provider, kind, rid)
         SELECT a, $2, $3, $4 FROM UNNEST($1::text[]) AS a ON CONFLICT DO NOTHING",
    )
    .bind(aliases)
    .bind(provider)
    .bind(kind)
    .bind(rid)
    .execute(conn)
    .await?;
    Ok(())
}

async fn write_side(
    conn: &mut PgConnection,
    side: &RefundsAndProgress<'_>,
    now: &str,
) -> Result<(), StoreError> {
    for r in &side.opened {
        let (presentment_amount, presentment_currency) = r.presentment.unwrap_or_default();
        sqlx::query(
            "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                                  currency, opened_at, completed_at, updated_at, trigger_type,
                                  trigger_id, presentment_amount, presentment_currency)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $10, $12, $13, $14, $15)
             ON CONFLICT (rid) DO NOTHING",
        )
        .bind(r.rid)
        .bind(r.provider)
        .bind(r.kind)
        .bind(r.resource_id)
        .bind(r.parent_id)
        .bind(r.status)
        .bind(r.reason)
        .bind(r.amount)
        .bind(r.currency)
        .bind(r.now)
        .bind((r.status == "completed").then_some(r.now))
        .bind(r.trigger_type)
        .bind(r.trigger_id)
        .bind(presentment_amount)
        .bind(presentment_currency)
        .execute(&mut *conn)
        .await?;
    }
    for r in &side.settled {
        sqlx::query(
            "UPDATE refunds SET status = $2,
                    completed_at = CASE WHEN $2 = 'completed' THEN $3 ELSE completed_at END,
                    updated_at = $3, trigger_type = $4, trigger_id = $5
             WHERE rid = $1 AND status = 'pending'",
        )
        .bind(r.rid)
        .bind(r.status)
        .bind(now)
        .bind(r.trigger_type)
        .bind(r.trigger_id)
        .execute(&mut *conn)
        .await?;
    }
    for p in &side.progress {
        sqlx::query(
            "INSERT INTO progress (rid, observed_at, status, success_count, failure_count,
                                   validated_count, trigger_type, trigger_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(p.rid)
        .bind(p.observed_at)
        .bind(p.status)
        .bind(p.success)
        .bind(p.failure)
        .bind(p.validated)
        .bind(p.trigger_type)
        .bind(p.trigger_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn insert_transitions(
    conn: &mut PgConnection,
    transitions: &[crate::store::sqlite::resources::NewTransition<'_>],
) -> Result<(), StoreError> {
    for t in transitions {
        sqlx::query(
            "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                      to_status, observed_at, provider_at, trigger_type, trigger_id,
                                      livemode, snapshot)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(t.rid)
        .bind(t.provider)
        .bind(t.kind)
        .bind(t.resource_id)
        .bind(t.parent_id)
        .bind(t.from_status)
        .bind(t.to_status)
        .bind(t.observed_at)
        .bind(t.provider_at)
        .bind(t.trigger_type)
        .bind(t.trigger_id)
        .bind(t.livemode)
        .bind(t.snapshot)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A reversal event named an item: its refund is completed (opened as
/// completed when none was open). False when the item is not known yet.
pub async fn record_reversal(
    conn: &mut PgConnection,
    config: &Config,
    target: &Target,
    trigger: &Trigger,
    now: Timestamp,
    changes: &mut Changes,
) -> Result<bool, StoreError> {
    let now_s = time::fmt(now);
    let Some(provider) = knowledge::of_kind(&target.kind) else {
        return Ok(false);
    };
    let item = match lock(conn, provider.name(), &target.kind, &target.id).await? {
        Some(item) => Some(item),
        None => {
            sqlx::query_as::<_, Resource>(&format!(
                "SELECT {NO_SNAPSHOT} FROM resources WHERE rid =
                    (SELECT rid FROM resource_aliases WHERE alias = $1 AND provider = $2 AND kind = $3)
                 FOR UPDATE"
            ))
            .bind(&target.id)
            .bind(provider.name())
            .bind(&target.kind)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    let Some(item) = item else {
        return Ok(false);
    };
    let existing = crate::store::alerting::AlertRows::refund_of(&mut *conn, item.rid)
        .await?
        .map(|r| r.status);
    if let Some((obs, signal, change)) = reversal(provider.name(), &item, existing.as_deref()) {
        let mut side = RefundsAndProgress::default();
        side.refund(&obs, &item, &signal, change, &now_s, trigger);
        write_side(conn, &side, &now_s).await?;
        if leaves_reconcile(config, &item) {
            sqlx::query(
                "UPDATE resources SET next_reconcile_at = NULL, reconcile_failures = 0 WHERE rid = $1",
            )
            .bind(item.rid)
            .execute(&mut *conn)
            .await?;
        }
    }
    rules::on_resource_recorded(&mut *conn, config, item.rid, &now_s, changes).await?;
    Ok(true)
}
