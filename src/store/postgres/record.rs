//! Recording observations on PostgreSQL. What changes is decided by the
//! same code as on SQLite (the judging, refund and reconcile decisions of
//! `sqlite::record`, which hold no SQL); this file reads and writes the
//! rows, with a few statements for a whole run of observations rather than
//! a few for each: one round trip costs far more than a row.
//!
//! It locks each resource row it judges (`FOR UPDATE`) until the
//! transaction ends, so two replicas recording one resource are judged one
//! after the other and write one transition for one change. The rows a
//! statement locks are locked in the order of their rid, and the rows it
//! adds are added in the order of their key, so two replicas recording the
//! same resources, listed in whatever order, wait for each other rather
//! than deadlock.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

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
use crate::store::sqlite::resources::{NewRefund, NewTransition, ResourceKey, StateUpdate};
use crate::store::StoreError;
use crate::time::{self, Timestamp};

pub const RESOURCE_COLUMNS: &str =
    "rid, provider, kind, id, parent_id, status, terminal, livemode, context,
     amount, currency, snapshot, provider_updated_at, status_since, first_seen_at, last_observed_at,
     not_found, cancel_requested_at, next_reconcile_at, reconcile_failures";

/// The columns of `resources r` but its snapshot, which recording never
/// reads (qualified: some statements join other rows with the same names).
const NO_SNAPSHOT: &str =
    "r.rid, r.provider, r.kind, r.id, r.parent_id, r.status, r.terminal, r.livemode, r.context,
     r.amount, r.currency, NULL::text AS snapshot, r.provider_updated_at, r.status_since,
     r.first_seen_at, r.last_observed_at, r.not_found, r.cancel_requested_at, r.next_reconcile_at,
     r.reconcile_failures";

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

/// [`record_all`] for observations none of whose resources come twice.
async fn record_run(
    conn: &mut PgConnection,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Vec<Recorded>, StoreError> {
    let now_s = time::fmt(now);
    let seen = look_up(conn, config, items, &now_s).await?;
    // Refunds are opened only by observations, so a resource never observed
    // before has none to read.
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
    let updates = state_updates(items, &decisions.fresh, &now_s);
    let updated = update_states(conn, &updates).await?;
    add_aliases(conn, &seen).await?;
    write_side(conn, &decisions.side, &now_s).await?;
    let transitions = new_transitions(items, &decisions.fresh, &now_s);
    insert_transitions(conn, &transitions).await?;
    let (recorded, rows) =
        what_was_recorded(items, &seen, &decisions.fresh, &transitions, updated)?;
    let keys: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r.provider.as_str(), r.kind.as_str(), r.id.as_str()))
        .collect();
    let open = super::alerting::open_alerts_about_many(&mut *conn, &keys).await?;
    rules::on_observation_recorded(&mut *conn, config, &rows, &open, &now_s, changes).await?;
    Ok(recorded)
}

/// A resource's key as stored: `(provider, kind, id)`.
type Stored = HashMap<(String, String, String), Resource>;

fn stored_key(k: &ResourceKey<'_>) -> (String, String, String) {
    (k.provider.to_string(), k.kind.to_string(), k.id.to_string())
}

/// The row of `key` in `stored`, which holds it by now.
fn row_of(stored: &Stored, key: &ResourceKey<'_>) -> Result<Resource, StoreError> {
    stored
        .get(&stored_key(key))
        .cloned()
        .ok_or(StoreError::Invariant("a resource just added has no row"))
}

/// The observed resources, locked (added first when new), each judged;
/// then the children of the fresh ones (an item stored under another of
/// its keys is found by it).
async fn look_up<'a>(
    conn: &mut PgConnection,
    config: &Config,
    items: &[ToRecord<'a>],
    now_s: &str,
) -> Result<Vec<Seen<'a>>, StoreError> {
    let keys: Vec<ResourceKey> = items.iter().map(|i| key_of(i.obs, i.context)).collect();
    let stored = lock_or_add(conn, &keys, now_s).await?;
    let mut seen = Vec::with_capacity(items.len());
    for (i, (item, key)) in items.iter().zip(&keys).enumerate() {
        let current = row_of(&stored, key)?;
        seen.push(Seen::judged(config, i, true, item.obs, current, false));
    }
    // An answer that lists an item twice is recorded with its first listing.
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
    if children.is_empty() {
        return Ok(seen);
    }
    let keys: Vec<ResourceKey> = children
        .iter()
        .map(|(item, c)| key_of(c, items[*item].context))
        .collect();
    let stored = lock(conn, &keys).await?;
    // Those not stored under their own key may be under another of theirs;
    // the others are added.
    let missing: Vec<usize> = (0..keys.len())
        .filter(|&j| !stored.contains_key(&stored_key(&keys[j])))
        .collect();
    let others: Vec<Vec<String>> = missing
        .iter()
        .map(|&j| knowledge::other_keys(children[j].1))
        .collect();
    let observed: Vec<&Observation> = missing.iter().map(|&j| children[j].1).collect();
    let under = stored_under(conn, &observed, &others).await?;
    let new: Vec<ResourceKey> = missing
        .iter()
        .zip(&under)
        .filter(|(_, found)| found.is_none())
        .map(|(&j, _)| keys[j])
        .collect();
    let added = add_and_lock(conn, &new, now_s).await?;
    let mut resolved: HashMap<usize, (Resource, Vec<String>)> = HashMap::new();
    for ((&j, others), found) in missing.iter().zip(others).zip(under) {
        let current = match found {
            Some(found) => found,
            None => row_of(&added, &keys[j])?,
        };
        let aliases = std::iter::once(children[j].1.id.clone())
            .chain(others)
            .filter(|k| *k != current.id)
            .collect();
        resolved.insert(j, (current, aliases));
    }
    for (j, ((item, obs), key)) in children.into_iter().zip(&keys).enumerate() {
        let (current, aliases) = match resolved.remove(&j) {
            Some(resolved) => resolved,
            None => (row_of(&stored, key)?, Vec::new()),
        };
        let mut child = Seen::judged(config, item, false, obs, current, false);
        child.aliases = aliases;
        seen.push(child);
    }
    Ok(seen)
}

/// The resources of `keys`, locked; those not stored are added (without a
/// status) first.
async fn lock_or_add(
    conn: &mut PgConnection,
    keys: &[ResourceKey<'_>],
    now_s: &str,
) -> Result<Stored, StoreError> {
    let mut stored = lock(conn, keys).await?;
    let new: Vec<ResourceKey> = keys
        .iter()
        .filter(|k| !stored.contains_key(&stored_key(k)))
        .copied()
        .collect();
    stored.extend(add_and_lock(conn, &new, now_s).await?);
    Ok(stored)
}

/// The stored resources of `keys`, locked in the order of their rid.
async fn lock(conn: &mut PgConnection, keys: &[ResourceKey<'_>]) -> Result<Stored, StoreError> {
    if keys.is_empty() {
        return Ok(Stored::new());
    }
    let rows: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {NO_SNAPSHOT} FROM resources r
         WHERE (r.id, r.provider, r.kind) IN
               (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))
         ORDER BY r.rid FOR UPDATE OF r"
    ))
    .bind(keys.iter().map(|k| k.id).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.provider).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.kind).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.provider.clone(), r.kind.clone(), r.id.clone()), r))
        .collect())
}

/// Adds the resources of `keys` (without a status; one another replica
/// added meanwhile is left as it is), then locks them. They are added in
/// the order of their key: a replica adding one another is adding too
/// waits for it, and two waiting for each other would be a deadlock.
async fn add_and_lock(
    conn: &mut PgConnection,
    keys: &[ResourceKey<'_>],
    now_s: &str,
) -> Result<Stored, StoreError> {
    if keys.is_empty() {
        return Ok(Stored::new());
    }
    sqlx::query(
        "INSERT INTO resources (provider, kind, id, parent_id, context, first_seen_at)
         SELECT provider, kind, id, parent_id, context, $6
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
              AS k (provider, kind, id, parent_id, context)
         ORDER BY id, provider, kind
         ON CONFLICT (id, provider, kind) DO NOTHING",
    )
    .bind(keys.iter().map(|k| k.provider).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.kind).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.id).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.parent_id).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.context).collect::<Vec<_>>())
    .bind(now_s)
    .execute(&mut *conn)
    .await?;
    lock(conn, keys).await
}

/// For each of `observed` (with its other keys, `others`), the resource
/// stored under another of its keys, locked: known by its id as an alias,
/// or stored under (or known as) one of its other keys, in that order.
async fn stored_under(
    conn: &mut PgConnection,
    observed: &[&Observation],
    others: &[Vec<String>],
) -> Result<Vec<Option<Resource>>, StoreError> {
    if observed.is_empty() {
        return Ok(Vec::new());
    }
    // Every place to look, ranked: (observation, rank, provider, kind, key,
    // whether the key is an alias).
    let mut places: Vec<(i64, i32, &str, &str, &str, bool)> = Vec::new();
    for (n, (obs, others)) in observed.iter().zip(others).enumerate() {
        let (n, provider, kind) = (n as i64, obs.provider, obs.kind.as_str());
        places.push((n, 0, provider, kind, obs.id.as_str(), true));
        for (rank, key) in (1..).step_by(2).zip(others) {
            places.push((n, rank, provider, kind, key.as_str(), false));
            places.push((n, rank + 1, provider, kind, key.as_str(), true));
        }
    }
    let found: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (p.n) p.n, f.rid
         FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[], $6::bool[])
              AS p (n, rank, provider, kind, key, alias)
         CROSS JOIN LATERAL (
             SELECT r.rid FROM resources r
             WHERE NOT p.alias AND r.id = p.key AND r.provider = p.provider AND r.kind = p.kind
             UNION ALL
             SELECT a.rid FROM resource_aliases a
             WHERE p.alias AND a.alias = p.key AND a.provider = p.provider AND a.kind = p.kind
         ) AS f
         ORDER BY p.n, p.rank",
    )
    .bind(places.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(places.iter().map(|p| p.1).collect::<Vec<_>>())
    .bind(places.iter().map(|p| p.2).collect::<Vec<_>>())
    .bind(places.iter().map(|p| p.3).collect::<Vec<_>>())
    .bind(places.iter().map(|p| p.4).collect::<Vec<_>>())
    .bind(places.iter().map(|p| p.5).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let mut under = vec![None; observed.len()];
    if found.is_empty() {
        return Ok(under);
    }
    let rids: Vec<i64> = found.iter().map(|f| f.1).collect();
    let locked: HashMap<i64, Resource> = sqlx::query_as::<_, Resource>(&format!(
        "SELECT {NO_SNAPSHOT} FROM resources r WHERE r.rid = ANY($1) ORDER BY r.rid FOR UPDATE"
    ))
    .bind(&rids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.rid, r))
    .collect();
    for (n, rid) in found {
        under[n as usize] = locked.get(&rid).cloned();
    }
    Ok(under)
}

/// `rows` cut into parts in which no key comes twice, each as long as it
/// can be: a statement that writes a part writes each of its rows once,
/// and a row that comes again is written by the next, after the one before.
fn parts_without_repeats<T, K: Hash + Eq>(rows: &[T], key: impl Fn(&T) -> K) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut keys = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        if !keys.insert(key(row)) {
            parts.push(&rows[start..i]);
            start = i;
            keys.clear();
            keys.insert(key(row));
        }
    }
    if start < rows.len() {
        parts.push(&rows[start..]);
    }
    parts
}

/// Writes the current state of each resource of `updates`; fields an
/// observation lacks keep their value. Every resource is stored by now
/// (added before it was judged), so none is new here. Returns the rows
/// written as they are now (without the snapshot just written), in the
/// order of `updates`; an update `only_if_changed` that would change
/// nothing writes nothing and returns no row.
async fn update_states(
    conn: &mut PgConnection,
    updates: &[StateUpdate<'_>],
) -> Result<Vec<Resource>, StoreError> {
    let mut rows = Vec::with_capacity(updates.len());
    for part in parts_without_repeats(updates, |u| u.rid) {
        let text = |f: for<'x> fn(&'x StateUpdate<'x>) -> Option<&'x str>| {
            part.iter().map(f).collect::<Vec<_>>()
        };
        let mut updated: HashMap<i64, Resource> = sqlx::query_as::<_, Resource>(&format!(
            "UPDATE resources r SET
                parent_id = COALESCE(u.parent_id, r.parent_id), status = u.status,
                terminal = u.terminal, livemode = COALESCE(u.livemode, r.livemode),
                context = COALESCE(u.context, r.context), amount = COALESCE(u.amount, r.amount),
                currency = COALESCE(u.currency, r.currency), snapshot = u.snapshot,
                provider_updated_at = COALESCE(u.provider_updated_at, r.provider_updated_at),
                status_since = u.status_since, last_observed_at = u.observed_at,
                not_found = false, next_reconcile_at = u.next_reconcile_at,
                reconcile_failures = 0
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bool[], $5::bool[],
                         $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::text[], $13::text[], $14::bool[])
                  AS u (rid, parent_id, status, terminal, livemode, context, amount, currency,
                        snapshot, provider_updated_at, status_since, observed_at,
                        next_reconcile_at, only_if_changed)
             WHERE r.rid = u.rid AND (NOT u.only_if_changed
                OR r.parent_id IS DISTINCT FROM COALESCE(u.parent_id, r.parent_id)
                OR r.status IS DISTINCT FROM u.status OR r.terminal IS DISTINCT FROM u.terminal
                OR r.livemode IS DISTINCT FROM COALESCE(u.livemode, r.livemode)
                OR r.context IS DISTINCT FROM COALESCE(u.context, r.context)
                OR r.amount IS DISTINCT FROM COALESCE(u.amount, r.amount)
                OR r.currency IS DISTINCT FROM COALESCE(u.currency, r.currency)
                OR r.snapshot IS DISTINCT FROM u.snapshot
                OR r.provider_updated_at
                    IS DISTINCT FROM COALESCE(u.provider_updated_at, r.provider_updated_at)
                OR r.status_since IS DISTINCT FROM u.status_since OR r.not_found
                OR r.next_reconcile_at IS DISTINCT FROM u.next_reconcile_at
                OR r.reconcile_failures <> 0)
             RETURNING {NO_SNAPSHOT}"
        ))
        .bind(part.iter().map(|u| u.rid).collect::<Vec<_>>())
        .bind(text(|u| u.parent_id))
        .bind(text(|u| Some(u.status)))
        .bind(part.iter().map(|u| u.terminal).collect::<Vec<_>>())
        .bind(part.iter().map(|u| u.livemode).collect::<Vec<_>>())
        .bind(text(|u| u.context))
        .bind(part.iter().map(|u| u.amount).collect::<Vec<_>>())
        .bind(text(|u| u.currency))
        .bind(text(|u| Some(u.snapshot)))
        .bind(text(|u| u.provider_updated_at))
        .bind(text(|u| Some(u.status_since)))
        .bind(text(|u| Some(u.observed_at)))
        .bind(text(|u| u.next_reconcile_at))
        .bind(part.iter().map(|u| u.only_if_changed).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.rid, r))
        .collect();
        for u in part {
            match updated.remove(&u.rid) {
                Some(row) => rows.push(row),
                None if u.only_if_changed => {}
                None => return Err(StoreError::Invariant("a resource being updated has no row")),
            }
        }
    }
    Ok(rows)
}

/// Remembers the other keys of the resources seen (those already taken
/// stay with the resource that has them: the first listed wins).
async fn add_aliases(conn: &mut PgConnection, seen: &[Seen<'_>]) -> Result<(), StoreError> {
    let aliases: Vec<(&str, &str, &str, i64)> = seen
        .iter()
        .flat_map(|s| {
            s.aliases.iter().map(|a| {
                (
                    a.as_str(),
                    s.obs.provider,
                    s.obs.kind.as_str(),
                    s.current.rid,
                )
            })
        })
        .collect();
    if aliases.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO resource_aliases (alias, provider, kind, rid)
         SELECT alias, provider, kind, rid
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY
              AS a (alias, provider, kind, rid, n)
         ORDER BY n
         ON CONFLICT DO NOTHING",
    )
    .bind(aliases.iter().map(|a| a.0).collect::<Vec<_>>())
    .bind(aliases.iter().map(|a| a.1).collect::<Vec<_>>())
    .bind(aliases.iter().map(|a| a.2).collect::<Vec<_>>())
    .bind(aliases.iter().map(|a| a.3).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The refunds opened and settled and the progress rows: one statement
/// for each kind of row.
async fn write_side(
    conn: &mut PgConnection,
    side: &RefundsAndProgress<'_>,
    now: &str,
) -> Result<(), StoreError> {
    if !side.opened.is_empty() {
        let opened = &side.opened;
        let text = |f: for<'x> fn(&'x NewRefund<'x>) -> Option<&'x str>| {
            opened.iter().map(f).collect::<Vec<_>>()
        };
        // A resource has at most one refund: a second is not opened.
        sqlx::query(
            "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                                  currency, opened_at, completed_at, updated_at, trigger_type,
                                  trigger_id, presentment_amount, presentment_currency)
             SELECT rid, provider, kind, resource_id, parent_id, status, reason, amount, currency,
                    opened_at, completed_at, opened_at, trigger_type, trigger_id,
                    presentment_amount, presentment_currency
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[],
                         $12::text[], $13::text[], $14::bigint[], $15::text[]) WITH ORDINALITY
                  AS f (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                        currency, opened_at, completed_at, trigger_type, trigger_id,
                        presentment_amount, presentment_currency, n)
             ORDER BY n
             ON CONFLICT (rid) DO NOTHING",
        )
        .bind(opened.iter().map(|r| r.rid).collect::<Vec<_>>())
        .bind(text(|r| Some(r.provider)))
        .bind(text(|r| Some(r.kind)))
        .bind(text(|r| Some(r.resource_id)))
        .bind(text(|r| r.parent_id))
        .bind(text(|r| Some(r.status)))
        .bind(text(|r| Some(r.reason)))
        .bind(opened.iter().map(|r| r.amount).collect::<Vec<_>>())
        .bind(text(|r| r.currency))
        .bind(text(|r| Some(r.now)))
        .bind(text(|r| (r.status == "completed").then_some(r.now)))
        .bind(text(|r| Some(r.trigger_type)))
        .bind(text(|r| r.trigger_id))
        .bind(
            opened
                .iter()
                .map(|r| r.presentment.and_then(|p| p.0))
                .collect::<Vec<_>>(),
        )
        .bind(text(|r| r.presentment.and_then(|p| p.1)))
        .execute(&mut *conn)
        .await?;
    }
    for part in parts_without_repeats(&side.settled, |r| r.rid) {
        sqlx::query(
            "UPDATE refunds f SET status = s.status,
                    completed_at = CASE WHEN s.status = 'completed' THEN $5 ELSE f.completed_at END,
                    updated_at = $5, trigger_type = s.trigger_type, trigger_id = s.trigger_id
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[])
                  AS s (rid, status, trigger_type, trigger_id)
             WHERE f.rid = s.rid AND f.status = 'pending'",
        )
        .bind(part.iter().map(|r| r.rid).collect::<Vec<_>>())
        .bind(part.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(part.iter().map(|r| r.trigger_type).collect::<Vec<_>>())
        .bind(part.iter().map(|r| r.trigger_id).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    if !side.progress.is_empty() {
        let progress = &side.progress;
        sqlx::query(
            "INSERT INTO progress (rid, observed_at, status, success_count, failure_count,
                                   validated_count, trigger_type, trigger_id)
             SELECT rid, observed_at, status, success_count, failure_count, validated_count,
                    trigger_type, trigger_id
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::text[], $8::text[]) WITH ORDINALITY
                  AS p (rid, observed_at, status, success_count, failure_count, validated_count,
                        trigger_type, trigger_id, n)
             ORDER BY n",
        )
        .bind(progress.iter().map(|p| p.rid).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.observed_at).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.status).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.success).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.failure).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.validated).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.trigger_type).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.trigger_id).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Inserts transition rows in the order given (their ids keep it).
async fn insert_transitions(
    conn: &mut PgConnection,
    transitions: &[NewTransition<'_>],
) -> Result<(), StoreError> {
    if transitions.is_empty() {
        return Ok(());
    }
    let text = |f: for<'x> fn(&'x NewTransition<'x>) -> Option<&'x str>| {
        transitions.iter().map(f).collect::<Vec<_>>()
    };
    sqlx::query(
        "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                  to_status, observed_at, provider_at, trigger_type, trigger_id,
                                  livemode, snapshot)
         SELECT rid, provider, kind, resource_id, parent_id, from_status, to_status, observed_at,
                provider_at, trigger_type, trigger_id, livemode, snapshot
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::bool[],
                     $13::text[]) WITH ORDINALITY
              AS t (rid, provider, kind, resource_id, parent_id, from_status, to_status,
                    observed_at, provider_at, trigger_type, trigger_id, livemode, snapshot, n)
         ORDER BY n",
    )
    .bind(transitions.iter().map(|t| t.rid).collect::<Vec<_>>())
    .bind(text(|t| Some(t.provider)))
    .bind(text(|t| Some(t.kind)))
    .bind(text(|t| Some(t.resource_id)))
    .bind(text(|t| t.parent_id))
    .bind(text(|t| t.from_status))
    .bind(text(|t| Some(t.to_status)))
    .bind(text(|t| Some(t.observed_at)))
    .bind(text(|t| t.provider_at))
    .bind(text(|t| Some(t.trigger_type)))
    .bind(text(|t| t.trigger_id))
    .bind(transitions.iter().map(|t| t.livemode).collect::<Vec<_>>())
    .bind(text(|t| Some(t.snapshot)))
    .execute(conn)
    .await?;
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
    let key = ResourceKey {
        provider: provider.name(),
        kind: &target.kind,
        id: &target.id,
        parent_id: None,
        context: None,
    };
    let item = match lock(conn, &[key]).await?.into_values().next() {
        Some(item) => Some(item),
        None => {
            sqlx::query_as::<_, Resource>(&format!(
                "SELECT {NO_SNAPSHOT} FROM resources r WHERE r.rid =
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

#[cfg(test)]
mod tests {
    use super::parts_without_repeats;

    #[test]
    fn parts_hold_each_key_once_and_keep_the_order() {
        let rows = [1, 2, 3, 2, 4, 1, 1];
        let parts = parts_without_repeats(&rows, |r| *r);
        assert_eq!(parts, [&[1, 2, 3][..], &[2, 4, 1], &[1]]);
        assert!(parts_without_repeats(&[] as &[i32], |r| *r).is_empty());
    }
}
