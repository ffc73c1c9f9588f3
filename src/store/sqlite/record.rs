//! Records observations inside the writer's transaction: reads what is
//! stored, asks [`crate::domain::observe`] what changes, writes the rows, then
//! runs the alert rules on what was written.

use crate::config::Config;
use crate::domain::alerts::Changes;
use crate::domain::observe::{
    judge, next_reconcile, presentment, refund_change, Moved, Recorded, RefundChange, Stored,
    ToRecord, Trigger, Verdict, Watched,
};
use crate::providers::{self, Observation, RefundSignal, RefundStatus, StatusClass, Target};
use crate::store::StoreError;
use crate::time::{self, Timestamp};

use super::resources::{self, NewRefund, NewTransition, StateUpdate};
use super::{on_handle, Tx};

/// Records an observation (and its children) in `tx`.
pub async fn record(
    tx: &mut Tx<'_>,
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
    let mut recorded = record_all(tx, config, &[item], now, changes).await?;
    Ok(recorded.pop().unwrap_or_default())
}

/// Records many observations (and their children) in `tx`, with a few
/// statements for all of them rather than a few each: what is stored is
/// read in one go, every decision is made in memory by the pure functions
/// above, and states, transitions and alerts are written in one go each.
/// Observations that share a resource are recorded in turn, each seeing the
/// one before. What was recorded, per observation.
pub async fn record_all(
    tx: &mut Tx<'_>,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Vec<Recorded>, StoreError> {
    let mut recorded = Vec::with_capacity(items.len());
    for run in runs(items) {
        recorded.extend(record_run(tx, config, &items[run], now, changes).await?);
    }
    Ok(recorded)
}

/// `items` cut into runs in which no resource comes twice, each as long as
/// it can be: a run is recorded in one go, and an observation of a
/// resource already in the run waits for the next, to see the one before.
pub(crate) fn runs(items: &[ToRecord<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut seen = std::collections::HashSet::new();
        let mut end = start;
        while end < items.len() {
            let keys = resource_keys(items[end].obs);
            if end > start && keys.iter().any(|k| seen.contains(k)) {
                break;
            }
            seen.extend(keys);
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// The resources an observation may write: itself and its children.
pub(crate) fn resource_keys(obs: &Observation) -> Vec<(&str, &str)> {
    std::iter::once(obs)
        .chain(&obs.children)
        .map(|o| (o.kind.as_str(), o.id.as_str()))
        .collect()
}

/// One observed resource (an item's own, or one of its children) with what
/// is stored of it.
pub(crate) struct Seen<'a> {
    pub(crate) item: usize,
    /// True for the item's own resource, false for its children.
    pub(crate) own: bool,
    pub(crate) obs: &'a Observation,
    pub(crate) current: resources::Resource,
    /// Not stored yet: written whole with its state ([`resources::find_many`]).
    pub(crate) new: bool,
    pub(crate) verdict: Verdict,
    /// Other keys to remember it by ([`resources::aliases`]).
    pub(crate) aliases: Vec<String>,
}

impl<'a> Seen<'a> {
    /// `obs` (of item `item`; `own`: the item's own resource) judged
    /// against `current`, its resource as stored.
    pub(crate) fn judged(
        config: &Config,
        item: usize,
        own: bool,
        obs: &'a Observation,
        current: resources::Resource,
        new: bool,
    ) -> Seen<'a> {
        let stored = Stored {
            status: current.status.clone(),
            terminal: current.terminal,
            provider_at: current.provider_updated_at.clone(),
        };
        let verdict = judge(
            &stored,
            &obs.kind,
            &obs.status,
            obs.provider_at.as_deref(),
            &config.juice.reversed_statuses,
        );
        Seen {
            item,
            own,
            obs,
            current,
            new,
            verdict,
            aliases: Vec::new(),
        }
    }
}

/// What is decided for a fresh observation, owned so that the statements
/// below can borrow it.
pub(crate) struct Decided<'a> {
    pub(crate) seen: &'a Seen<'a>,
    pub(crate) status_since: String,
    pub(crate) next_reconcile_at: Option<String>,
    pub(crate) changed: bool,
}

/// [`record_all`] for observations none of whose resources come twice:
/// their rows are written straight on the writer's handle
/// ([`on_handle`]), then the alert rules see them.
async fn record_run(
    tx: &mut Tx<'_>,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Vec<Recorded>, StoreError> {
    let now_s = time::fmt(now);
    let (recorded, rows, open) = on_handle(tx, |conn| {
        let (recorded, rows) = write_run(conn, config, items, now, &now_s)?;
        let keys: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.provider.as_str(), r.kind.as_str(), r.id.as_str()))
            .collect();
        let open = super::alerts::open_about_many(conn, &keys)?;
        Ok((recorded, rows, open))
    })
    .await?;
    // Alert rules see every resource looked at as it is now, and commit or
    // roll back with what was written.
    crate::store::alerting::rules::on_observation_recorded(
        tx, config, &rows, &open, &now_s, changes,
    )
    .await?;
    Ok(recorded)
}

/// The rows of [`record_run`]; what was recorded per item, and every
/// resource looked at as it is now.
fn write_run(
    conn: &rusqlite::Connection,
    config: &Config,
    items: &[ToRecord<'_>],
    now: Timestamp,
    now_s: &str,
) -> Result<(Vec<Recorded>, Vec<resources::Resource>), StoreError> {
    let seen = look_up(conn, config, items, now_s)?;
    let refunds = stored_refunds(conn, &seen)?;
    let Decisions { stale, fresh, side } = decide(config, items, &seen, refunds, now, now_s);

    if !stale.is_empty() {
        resources::touch_many(conn, &stale, now_s)?;
    }
    // States first: a new resource's row must exist before the refund,
    // progress, transition and alias rows that refer to it.
    let updated = write_states(conn, items, &fresh, now_s)?;
    for s in &seen {
        let (provider, kind) = (s.obs.provider, s.obs.kind.as_str());
        resources::aliases::add(conn, s.current.rid, provider, kind, &s.aliases)?;
    }
    side.write(conn, now_s)?;
    let transitions = write_transitions(conn, items, &fresh, now_s)?;
    what_was_recorded(items, &seen, &fresh, &transitions, updated)
}

/// The observed resources as stored, each judged against its observation,
/// then the children of those that are not stale: children came in the same
/// answer, so when it is stale, so are they.
fn look_up<'a>(
    conn: &rusqlite::Connection,
    config: &Config,
    items: &[ToRecord<'a>],
    now_s: &str,
) -> Result<Vec<Seen<'a>>, StoreError> {
    let mut rids = resources::NewRids::default();
    let keys: Vec<_> = items.iter().map(|i| key_of(i.obs, i.context)).collect();
    let mut seen: Vec<Seen> = resources::find_many(conn, &keys, now_s, &mut rids)?
        .into_iter()
        .enumerate()
        .map(|(i, (current, new))| Seen::judged(config, i, true, items[i].obs, current, new))
        .collect();
    // An answer that lists an item twice is recorded with its first listing.
    let mut listed: std::collections::HashSet<(&str, &str)> = items
        .iter()
        .map(|i| (i.obs.kind.as_str(), i.obs.id.as_str()))
        .collect();
    let children: Vec<(usize, &Observation)> = seen
        .iter()
        .filter(|s| s.verdict != Verdict::Stale)
        .flat_map(|s| s.obs.children.iter().map(move |c| (s.item, c)))
        .filter(|(_, c)| listed.insert((c.kind.as_str(), c.id.as_str())))
        .collect();
    if !children.is_empty() {
        let keys: Vec<_> = children
            .iter()
            .map(|(item, c)| key_of(c, items[*item].context))
            .collect();
        let stored = resources::find_many(conn, &keys, now_s, &mut rids)?;
        // An item may be stored under another of its keys (its id, its reference).
        let observed: Vec<&Observation> = children.iter().map(|(_, c)| *c).collect();
        let (stored, aliases) = resources::aliases::resolve(conn, &observed, stored)?;
        for (((item, obs), (current, new)), aliases) in
            children.into_iter().zip(stored).zip(aliases)
        {
            let mut child = Seen::judged(config, item, false, obs, current, new);
            child.aliases = aliases;
            seen.push(child);
        }
    }
    Ok(seen)
}

/// The stored refund status of each resource seen fresh that has a refund.
fn stored_refunds(
    conn: &rusqlite::Connection,
    seen: &[Seen<'_>],
) -> Result<std::collections::HashMap<i64, String>, StoreError> {
    // Refunds are opened only by observations, so a resource never observed
    // before has none to read.
    let observed_before: Vec<i64> = seen
        .iter()
        .filter(|s| s.verdict != Verdict::Stale && s.current.status.is_some())
        .map(|s| s.current.rid)
        .collect();
    if observed_before.is_empty() {
        Ok(Default::default())
    } else {
        resources::refund_statuses(conn, &observed_before)
    }
}

/// What a run decided, before any of it is written.
pub(crate) struct Decisions<'a> {
    /// Rids of the resources whose observation was stale.
    pub(crate) stale: Vec<i64>,
    /// The fresh observations, in the order seen.
    pub(crate) fresh: Vec<Decided<'a>>,
    pub(crate) side: RefundsAndProgress<'a>,
}

/// Decides in memory what each observation seen writes: a stale one only
/// its time seen; a fresh one its refund and progress rows, its status time
/// and its next reconcile. `refunds` holds the stored refund statuses.
pub(crate) fn decide<'a>(
    config: &Config,
    items: &'a [ToRecord<'a>],
    seen: &'a [Seen<'a>],
    mut refunds: std::collections::HashMap<i64, String>,
    now: Timestamp,
    now_s: &'a str,
) -> Decisions<'a> {
    let mut stale = Vec::new();
    let mut fresh = Vec::new();
    let mut side = RefundsAndProgress::default();
    for s in seen {
        if s.verdict == Verdict::Stale {
            tracing::debug!(resource = %s.obs.id, stored = s.current.status.as_deref(), observed = %s.obs.status, "stale observation ignored");
            stale.push(s.current.rid);
            continue;
        }
        let item = &items[s.item];
        let rid = s.current.rid;
        // Refund first: whether one stays pending decides the reconcile time.
        if let Some(signal) = &s.obs.refund {
            let existing = refunds.get(&rid).map(String::as_str);
            if let Some(change) = refund_change(existing, signal.status) {
                side.refund(s.obs, &s.current, signal, change, now_s, item.trigger);
                let (RefundChange::Open(status) | RefundChange::Settle(status)) = change;
                refunds.insert(rid, status.as_str().to_string());
            }
        }
        if let Some(p) = s.obs.progress {
            side.progress.push(resources::NewProgress {
                rid,
                observed_at: now_s,
                status: &s.obs.status,
                success: p.success,
                failure: p.failure,
                validated: p.validated,
                trigger_type: item.trigger.kind,
                trigger_id: item.trigger.id.as_deref(),
            });
        }
        let changed = matches!(s.verdict, Verdict::First | Verdict::Changed);
        let status_since = if changed {
            now_s.to_string()
        } else {
            s.current
                .status_since
                .clone()
                .unwrap_or_else(|| now_s.to_string())
        };
        let refund_pending_since = (refunds.get(&rid).map(String::as_str) == Some("pending"))
            .then(|| time::parse_lenient(&status_since).unwrap_or(now));
        let watched = providers::knowledge::watch_after_settle(config, &s.obs.kind, &s.obs.status)
            .map(|watch| {
                let since = time::parse_lenient(&status_since).unwrap_or(now);
                Watched::new(watch, s.obs.provider_at.as_deref(), since)
            });
        // While the resource it came with moves, a child is fetched with it
        // (`knowledge::reconcile_target`): it needs no time of its own, and
        // one that rests is then not written again each time.
        let followed_with_parent = !s.own && item.obs.class == StatusClass::Transitional;
        fresh.push(Decided {
            seen: s,
            next_reconcile_at: next_reconcile(
                s.obs.class,
                refund_pending_since,
                now,
                config.reconcile.interval_secs,
                config.reconcile.max_interval_secs,
                watched,
            )
            .filter(|_| !followed_with_parent),
            status_since,
            changed,
        });
    }
    Decisions { stale, fresh, side }
}

/// Writes the current state of each fresh observation's resource (adding
/// those not stored yet); the rows as they are now, in the order of `fresh`.
fn write_states(
    conn: &rusqlite::Connection,
    items: &[ToRecord<'_>],
    fresh: &[Decided<'_>],
    now_s: &str,
) -> Result<Vec<resources::Resource>, StoreError> {
    let updates = state_updates(items, fresh, now_s);
    if updates.is_empty() {
        Ok(Vec::new())
    } else {
        resources::update_states(conn, &updates)
    }
}

/// The current state each fresh observation gives its resource, in the
/// order of `fresh`.
pub(crate) fn state_updates<'a>(
    items: &'a [ToRecord<'a>],
    fresh: &'a [Decided<'a>],
    now_s: &'a str,
) -> Vec<StateUpdate<'a>> {
    fresh
        .iter()
        .map(|d| StateUpdate {
            rid: d.seen.current.rid,
            new: d
                .seen
                .new
                .then(|| key_of(d.seen.obs, items[d.seen.item].context)),
            parent_id: d.seen.obs.parent_id.as_deref(),
            status: &d.seen.obs.status,
            terminal: d.seen.obs.class == StatusClass::Terminal,
            livemode: d.seen.obs.livemode,
            context: items[d.seen.item].context,
            amount: d.seen.obs.amount,
            currency: d.seen.obs.currency.as_deref(),
            snapshot: &d.seen.obs.snapshot,
            provider_updated_at: d.seen.obs.provider_at.as_deref(),
            status_since: &d.status_since,
            observed_at: now_s,
            next_reconcile_at: d.next_reconcile_at.as_deref(),
            only_if_changed: !d.seen.own,
        })
        .collect()
}

/// A transition for each fresh observation that changed its resource's
/// status, in the order of `fresh`.
pub(crate) fn new_transitions<'a>(
    items: &'a [ToRecord<'a>],
    fresh: &'a [Decided<'a>],
    now_s: &'a str,
) -> Vec<NewTransition<'a>> {
    fresh
        .iter()
        .filter(|d| d.changed)
        .map(|d| {
            let (obs, current) = (d.seen.obs, &d.seen.current);
            let trigger = items[d.seen.item].trigger;
            NewTransition {
                rid: current.rid,
                provider: obs.provider,
                kind: &obs.kind,
                resource_id: &current.id,
                parent_id: obs.parent_id.as_deref().or(current.parent_id.as_deref()),
                from_status: current.status.as_deref(),
                to_status: &obs.status,
                observed_at: now_s,
                provider_at: obs.provider_at.as_deref(),
                trigger_type: trigger.kind,
                trigger_id: trigger.id.as_deref(),
                livemode: obs.livemode.or(current.livemode),
                snapshot: &d.seen.obs.snapshot,
            }
        })
        .collect()
}

/// Writes a transition for each fresh observation that changed its
/// resource's status; the rows written, in the order of `fresh`.
fn write_transitions<'a>(
    conn: &rusqlite::Connection,
    items: &'a [ToRecord<'a>],
    fresh: &'a [Decided<'a>],
    now_s: &'a str,
) -> Result<Vec<NewTransition<'a>>, StoreError> {
    let transitions = new_transitions(items, fresh, now_s);
    if !transitions.is_empty() {
        resources::insert_transitions(conn, &transitions)?;
    }
    Ok(transitions)
}

/// What was recorded per item (its transitions, its rids, whether its own
/// observation was stale), and every resource seen as it is now: as
/// `updated` (the rows [`write_states`] wrote, in any order) when written,
/// as stored otherwise (stale, or a child that did not change).
pub(crate) fn what_was_recorded(
    items: &[ToRecord<'_>],
    seen: &[Seen<'_>],
    fresh: &[Decided<'_>],
    transitions: &[NewTransition<'_>],
    updated: Vec<resources::Resource>,
) -> Result<(Vec<Recorded>, Vec<resources::Resource>), StoreError> {
    let mut recorded = vec![Recorded::default(); items.len()];
    for (d, t) in fresh.iter().filter(|d| d.changed).zip(transitions) {
        recorded[d.seen.item].transitions.push(Moved {
            kind: t.kind.to_string(),
            resource_id: t.resource_id.to_string(),
            from: t.from_status.map(str::to_string),
            to: t.to_status.to_string(),
            trigger: items[d.seen.item].trigger.kind,
        });
    }
    let mut updated: std::collections::HashMap<i64, resources::Resource> =
        updated.into_iter().map(|r| (r.rid, r)).collect();
    let mut rows = Vec::with_capacity(seen.len());
    for s in seen {
        let r = &mut recorded[s.item];
        r.rids.push(s.current.rid);
        r.stale |= s.own && s.verdict == Verdict::Stale;
        match updated.remove(&s.current.rid) {
            Some(written) if s.verdict != Verdict::Stale => rows.push(written),
            Some(_) => return Err(StoreError::Invariant("a stale observation was written")),
            None if s.own && s.verdict != Verdict::Stale => {
                return Err(StoreError::Invariant(
                    "an observed resource was not written",
                ))
            }
            None => rows.push(s.current.clone()),
        }
    }
    Ok((recorded, rows))
}

pub(crate) fn key_of<'a>(
    obs: &'a Observation,
    context: Option<&'a str>,
) -> resources::ResourceKey<'a> {
    resources::ResourceKey {
        provider: obs.provider,
        kind: &obs.kind,
        id: &obs.id,
        parent_id: obs.parent_id.as_deref(),
        context,
    }
}

/// The refund and progress rows a run writes, gathered so that each kind
/// is one statement however many observations the run holds.
#[derive(Default)]
pub(crate) struct RefundsAndProgress<'a> {
    pub(crate) opened: Vec<NewRefund<'a>>,
    pub(crate) settled: Vec<resources::RefundSettlement<'a>>,
    pub(crate) progress: Vec<resources::NewProgress<'a>>,
}

impl<'a> RefundsAndProgress<'a> {
    /// `current`: the resource as stored, whose id may be another key of
    /// the one `obs` carries.
    pub(crate) fn refund(
        &mut self,
        obs: &'a Observation,
        current: &'a resources::Resource,
        signal: &'a RefundSignal,
        change: RefundChange,
        now: &'a str,
        trigger: &'a Trigger,
    ) {
        let rid = current.rid;
        match change {
            RefundChange::Open(status) => self.opened.push(NewRefund {
                rid,
                provider: obs.provider,
                kind: &obs.kind,
                resource_id: &current.id,
                parent_id: obs.parent_id.as_deref(),
                status: status.as_str(),
                reason: &signal.reason,
                amount: signal.amount,
                currency: signal.currency.as_deref(),
                presentment: presentment(obs, signal),
                now,
                trigger_type: trigger.kind,
                trigger_id: trigger.id.as_deref(),
            }),
            RefundChange::Settle(status) => self.settled.push(resources::RefundSettlement {
                rid,
                status: status.as_str(),
                trigger_type: trigger.kind,
                trigger_id: trigger.id.as_deref(),
            }),
        }
    }

    fn write(&self, conn: &rusqlite::Connection, now: &str) -> Result<(), StoreError> {
        resources::insert_refunds(conn, &self.opened)?;
        resources::settle_refunds(conn, &self.settled, now)?;
        resources::insert_progress(conn, &self.progress)
    }
}

/// What a reversal of `item` writes, given its stored refund status: the
/// refund completed (opened completed when none was open), as an
/// observation of the item as stored; `None` when it is completed already.
pub(crate) fn reversal(
    provider: &'static str,
    item: &resources::Resource,
    existing: Option<&str>,
) -> Option<(Observation, RefundSignal, RefundChange)> {
    let signal = RefundSignal {
        status: RefundStatus::Completed,
        reason: item.status.clone().unwrap_or_else(|| "reversed".into()),
        amount: item.amount,
        currency: item.currency.clone(),
    };
    let change = refund_change(existing, signal.status)?;
    let obs = Observation {
        provider,
        kind: item.kind.clone(),
        id: item.id.clone(),
        parent_id: item.parent_id.clone(),
        status: item.status.clone().unwrap_or_default(),
        class: StatusClass::Settled,
        provider_at: None,
        amount: item.amount,
        currency: item.currency.clone(),
        livemode: item.livemode,
        snapshot: String::new(),
        progress: None,
        children: Vec::new(),
        refund: None,
    };
    Some((obs, signal, change))
}

/// After its refund completed, the item is no longer reconciled for it,
/// unless its own status still moves.
pub(crate) fn leaves_reconcile(config: &Config, item: &resources::Resource) -> bool {
    providers::classify(
        &item.kind,
        item.status.as_deref().unwrap_or(""),
        &config.juice.reversed_statuses,
    ) != StatusClass::Transitional
}

/// A reversal event named an item: its refund is completed (opened as
/// completed when none was open). False when the item is not known yet.
pub async fn record_reversal(
    tx: &mut Tx<'_>,
    config: &Config,
    target: &Target,
    trigger: &Trigger,
    now: Timestamp,
    changes: &mut Changes,
) -> Result<bool, StoreError> {
    let now_s = time::fmt(now);
    let Some(provider) = providers::knowledge::of_kind(&target.kind) else {
        return Ok(false);
    };
    let item = match resources::get(tx, provider.name(), &target.kind, &target.id).await? {
        Some(item) => Some(item),
        None => resources::aliases::known_as(tx, provider.name(), &target.kind, &target.id).await?,
    };
    let Some(item) = item else {
        return Ok(false);
    };
    let existing = resources::refund_of(tx, item.rid).await?.map(|r| r.status);
    if let Some((obs, signal, change)) = reversal(provider.name(), &item, existing.as_deref()) {
        let mut side = RefundsAndProgress::default();
        side.refund(&obs, &item, &signal, change, &now_s, trigger);
        on_handle(tx, |conn| side.write(conn, &now_s)).await?;
        if leaves_reconcile(config, &item) {
            resources::mark_reconciled(tx, item.rid, None).await?;
        }
    }
    crate::store::alerting::rules::on_resource_recorded(tx, config, item.rid, &now_s, changes)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod db_tests {
    use super::*;
    use crate::providers::juice::objects::decode_bulk;
    use crate::providers::stripe::event::{BATCH_JOB, OUTBOUND_TRANSFER};
    use crate::providers::stripe::objects::decode;
    use crate::store::sqlite::Db;
    use serde_json::json;

    async fn db() -> (tempfile::TempDir, Db, Config) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::default();
        let db = Db::open(&dir.path().join("cw.db"), &config.database)
            .await
            .unwrap();
        (dir, db, config)
    }

    async fn put(db: &Db, config: &Config, obs: &Observation, trigger: &Trigger) -> Recorded {
        let mut tx = db.write.begin().await.unwrap();
        let context = Some("acct_1");
        let r = record(
            &mut tx,
            config,
            obs,
            trigger,
            context,
            time::now(),
            &mut Changes::new(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        r
    }

    fn history(ts: &[resources::Transition]) -> Vec<(Option<&str>, &str)> {
        ts.iter()
            .map(|t| (t.from_status.as_deref(), t.to_status.as_str()))
            .collect()
    }

    fn obt(status: &str) -> Observation {
        decode(
            OUTBOUND_TRANSFER,
            "obt_1",
            json!({"id": "obt_1", "status": status, "livemode": false,
                   "amount": {"value": 1500, "currency": "usd"},
                   "status_transitions": {"canceled_at": "2026-10-30T12:01:00Z"}}),
        )
        .unwrap()
    }

    /// Recording counts and logs nothing: whoever commits reports what was
    /// written ([`Recorded::report`]), so a transaction rolled back, or a
    /// batch written again after a failure, is not counted.
    #[test]
    fn transitions_are_counted_only_when_reported() {
        crate::metrics::with_local_metrics(|counted| async move {
            let (_dir, db, config) = db().await;
            let mut tx = db.write.begin().await.unwrap();
            let trigger = Trigger::event("evt_1");
            let obs = obt("canceled");
            let r = record(
                &mut tx,
                &config,
                &obs,
                &trigger,
                None,
                time::now(),
                &mut Changes::new(),
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(r.transitions.len(), 1);
            assert!(!counted.render().contains("cancelwatch_transitions_total"));
            r.report();
            let line = r#"cancelwatch_transitions_total{kind="stripe.outbound_transfer",to_status="canceled"} 1"#;
            assert!(counted.render().contains(line), "{}", counted.render());
            db.close().await;
        });
    }

    #[tokio::test]
    async fn one_transition_per_change_and_never_backwards() {
        let (_dir, db, config) = db().await;
        let r = put(&db, &config, &obt("processing"), &Trigger::event("evt_1")).await;
        assert_eq!(r.transitions.len(), 1);
        assert!(
            put(&db, &config, &obt("processing"), &Trigger::event("evt_2"))
                .await
                .transitions
                .is_empty()
        );
        let r = put(&db, &config, &obt("canceled"), &Trigger::cancel(7)).await;
        // What is counted and logged once committed.
        assert_eq!(
            r.transitions,
            [Moved {
                kind: OUTBOUND_TRANSFER.into(),
                resource_id: "obt_1".into(),
                from: Some("processing".into()),
                to: "canceled".into(),
                trigger: "cancel",
            }]
        );
        let r = put(&db, &config, &obt("processing"), &Trigger::reconcile()).await;
        assert!(r.stale);
        assert!(r.transitions.is_empty());

        let ts = resources::transitions_of(&db.read, "obt_1").await.unwrap();
        assert_eq!(
            history(&ts),
            vec![(None, "processing"), (Some("processing"), "canceled")]
        );
        assert_eq!(ts[0].trigger_type, "event");
        assert_eq!(ts[0].trigger_id.as_deref(), Some("evt_1"));
        assert_eq!(ts[1].trigger_type, "cancel");
        assert_eq!(ts[1].trigger_id.as_deref(), Some("7"));
        assert_eq!(
            ts[1].provider_at.as_deref(),
            Some("2026-10-30T12:01:00.000Z")
        );
        assert_eq!(ts[1].livemode, Some(false));

        let r = resources::find(&db.read, OUTBOUND_TRANSFER, "obt_1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status.as_deref(), Some("canceled"));
        assert!(r.terminal);
        assert!(r.next_reconcile_at.is_none());
        assert_eq!(r.context.as_deref(), Some("acct_1"));
        let refunds = resources::refunds_under(&db.read, "obt_1").await.unwrap();
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].status, "completed");
        assert_eq!(refunds[0].reason, "canceled");
        assert_eq!(refunds[0].amount, Some(1500));
        assert_eq!(refunds[0].currency.as_deref(), Some("usd"));
        assert!(refunds[0].completed_at.is_some());
    }

    #[tokio::test]
    async fn batch_progress_at_each_observation() {
        let (_dir, db, config) = db().await;
        let job = |status: &str, success: &str| {
            decode(
                BATCH_JOB,
                "batchv2_1",
                json!({"id": "batchv2_1", "status": status,
                       "status_details": {status: {"success_count": success, "failure_count": "0"}}}),
            )
            .unwrap()
        };
        put(
            &db,
            &config,
            &job("in_progress", "10"),
            &Trigger::event("e1"),
        )
        .await;
        put(
            &db,
            &config,
            &job("in_progress", "20"),
            &Trigger::reconcile(),
        )
        .await;
        put(&db, &config, &job("cancelling", "25"), &Trigger::cancel(1)).await;
        put(&db, &config, &job("canceled", "30"), &Trigger::event("e2")).await;
        let ts = resources::transitions_of(&db.read, "batchv2_1")
            .await
            .unwrap();
        assert_eq!(
            history(&ts),
            vec![
                (None, "in_progress"),
                (Some("in_progress"), "cancelling"),
                (Some("cancelling"), "canceled")
            ]
        );
        let counts: Vec<(String, Option<i64>)> =
            sqlx::query_as("SELECT status, success_count FROM progress ORDER BY id")
                .fetch_all(&db.read)
                .await
                .unwrap();
        assert_eq!(
            counts,
            vec![
                ("in_progress".into(), Some(10)),
                ("in_progress".into(), Some(20)),
                ("cancelling".into(), Some(25)),
                ("canceled".into(), Some(30)),
            ]
        );
        let refunds = resources::refunds_under(&db.read, "batchv2_1")
            .await
            .unwrap();
        assert!(refunds.is_empty(), "batch jobs move no money");
    }

    /// A resource observed for the first time is written once, whole
    /// ([`resources::find_many`]): its row, and the rows that refer to it
    /// (an item's refund, the transitions), come out as they do for a
    /// resource that was stored without a status before (a cancel issued
    /// through cancelwatch adds one so), down to the first-seen time.
    #[tokio::test]
    async fn a_first_observation_is_stored_as_if_added_then_updated() {
        let (_dir_a, added, config) = db().await;
        let (_dir_b, fresh, _) = db().await;
        let now = time::now();
        let now_s = time::fmt(now);
        let observation = decode_bulk(
            "bt_1",
            json!({"data": {"id": "bt_1", "status": "cancelled", "updated_at": "2024-10-02T17:05:00",
                            "items": [{"id": "it_1", "amount": 100, "status": "cancelled"},
                                      {"id": "it_2", "amount": 200, "status": "completed"}]}}),
            &config.juice.reversed_statuses,
        )
        .unwrap();
        // In `added`, the bulk transfer and one item are there already.
        let mut tx = added.write.begin().await.unwrap();
        for (kind, id, parent) in [
            ("juice.bulk_transfer", "bt_1", None),
            ("juice.transfer", "it_2", Some("bt_1")),
        ] {
            resources::ensure(&mut tx, "juice", kind, id, parent, None, &now_s)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        for db in [&added, &fresh] {
            let mut tx = db.write.begin().await.unwrap();
            let trigger = Trigger::event("k1");
            record(
                &mut tx,
                &config,
                &observation,
                &trigger,
                None,
                now,
                &mut Changes::new(),
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        async fn rows(db: &Db) -> Vec<String> {
            let resources: Vec<String> = sqlx::query_scalar(
                "SELECT json_array(kind, id, parent_id, status, terminal, amount, currency,
                                   snapshot, first_seen_at, last_observed_at, status_since,
                                   next_reconcile_at, livemode, context, not_found,
                                   reconcile_failures, cancel_requested_at)
                 FROM resources ORDER BY id",
            )
            .fetch_all(&db.read)
            .await
            .unwrap();
            let linked: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT 'transition', r.id, t.to_status FROM transitions t JOIN resources r USING (rid)
                 UNION ALL
                 SELECT 'refund', r.id, f.status FROM refunds f JOIN resources r USING (rid)
                 ORDER BY 1, 2",
            )
            .fetch_all(&db.read)
            .await
            .unwrap();
            let dangling: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pragma_foreign_key_check")
                .fetch_one(&db.read)
                .await
                .unwrap();
            assert_eq!(dangling, 0);
            resources
                .into_iter()
                .chain(linked.iter().map(|l| format!("{l:?}")))
                .collect()
        }
        let (want, got) = (rows(&added).await, rows(&fresh).await);
        assert_eq!(got, want);
        assert_eq!(got.len(), 3 + 3 + 1, "{got:#?}");
    }

    #[tokio::test]
    async fn juice_items_and_their_refunds() {
        let (_dir, db, config) = db().await;
        let rev = &config.juice.reversed_statuses;
        let bulk = |status: &str, items: serde_json::Value, at: &str| {
            decode_bulk(
                "bt_1",
                json!({"data": {"id": "bt_1", "status": status, "updated_at": at, "items": items}}),
                rev,
            )
            .unwrap()
        };
        put(
            &db,
            &config,
            &bulk(
                "executing",
                json!([{"id": "it_1", "amount": 100, "status": "pending"},
                       {"id": "it_2", "amount": 200, "status": "processing"}]),
                "2024-10-02T17:00:00",
            ),
            &Trigger::event("k1"),
        )
        .await;
        put(
            &db,
            &config,
            &bulk(
                "cancelled",
                json!([{"id": "it_1", "amount": 100, "status": "cancelled"},
                       {"id": "it_2", "amount": 200, "status": "completed"}]),
                "2024-10-02T17:05:00",
            ),
            &Trigger::event("k2"),
        )
        .await;
        // A stale copy arriving late changes nothing, its items included.
        let stale = put(
            &db,
            &config,
            &bulk(
                "executing",
                json!([{"id": "it_1", "amount": 100, "status": "pending"},
                       {"id": "it_2", "amount": 200, "status": "failed"}]),
                "2024-10-02T17:00:00",
            ),
            &Trigger::event("k0"),
        )
        .await;
        assert!(stale.stale);
        assert!(stale.transitions.is_empty());

        let it1 = resources::find(&db.read, "juice.transfer", "it_1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(it1.parent_id.as_deref(), Some("bt_1"));
        assert!(
            it1.next_reconcile_at.is_some(),
            "a pending refund keeps the item reconciled"
        );
        let refunds = resources::refunds_under(&db.read, "bt_1").await.unwrap();
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].resource_id, "it_1");
        assert_eq!(refunds[0].status, "pending");
        assert_eq!(refunds[0].amount, Some(100));

        // The reversal event completes it.
        let mut tx = db.write.begin().await.unwrap();
        let item = |id: &str| Target {
            kind: "juice.transfer".into(),
            id: id.into(),
            ..Target::default()
        };
        assert!(record_reversal(
            &mut tx,
            &config,
            &item("it_1"),
            &Trigger::event("k3"),
            time::now(),
            &mut Changes::new()
        )
        .await
        .unwrap());
        assert!(!record_reversal(
            &mut tx,
            &config,
            &item("it_404"),
            &Trigger::event("k4"),
            time::now(),
            &mut Changes::new()
        )
        .await
        .unwrap());
        tx.commit().await.unwrap();
        let refunds = resources::refunds_under(&db.read, "bt_1").await.unwrap();
        assert_eq!(refunds[0].status, "completed");
        assert_eq!(refunds[0].trigger_id.as_deref(), Some("k3"));
        let it1 = resources::find(&db.read, "juice.transfer", "it_1")
            .await
            .unwrap()
            .unwrap();
        assert!(it1.next_reconcile_at.is_none());

        let ts = resources::transitions_of(&db.read, "it_1").await.unwrap();
        assert_eq!(
            history(&ts),
            vec![(None, "pending"), (Some("pending"), "cancelled")]
        );
        assert_eq!(ts[1].parent_id.as_deref(), Some("bt_1"));
        let ts = resources::transitions_of(&db.read, "it_2").await.unwrap();
        assert_eq!(
            history(&ts),
            vec![(None, "processing"), (Some("processing"), "completed")]
        );
        let ts = resources::transitions_of(&db.read, "bt_1").await.unwrap();
        assert_eq!(
            history(&ts),
            vec![(None, "executing"), (Some("executing"), "cancelled")]
        );
    }

    /// A bulk transfer fetched again writes only what changed: an item
    /// that rests keeps its row as it was (it has no fetch time of its own
    /// while the bulk transfer moves), the item that moved is written, and
    /// the bulk transfer's snapshot holds no item stored on its own. Once
    /// the bulk transfer rests, an item still moving is fetched on its own
    /// time.
    #[tokio::test]
    async fn a_bulk_transfer_fetched_again_writes_only_what_changed() {
        let (_dir, db, config) = db().await;
        let rev = &config.juice.reversed_statuses;
        let bulk = |status: &str, second: &str| {
            decode_bulk(
                "bt_1",
                json!({"data": {"id": "bt_1", "status": status, "items": [
                    {"id": "it_1", "amount": 100, "status": "processing"},
                    {"id": "it_2", "amount": 200, "status": second},
                    {"amount": 300, "status": "processing"}]}}),
                rev,
            )
            .unwrap()
        };
        let put_at = |obs: Observation, at: Timestamp| {
            let db = &db;
            let config = &config;
            async move {
                let mut tx = db.write.begin().await.unwrap();
                let trigger = Trigger::reconcile();
                let r = record(
                    &mut tx,
                    config,
                    &obs,
                    &trigger,
                    None,
                    at,
                    &mut Changes::new(),
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                r
            }
        };
        let row = |id: &'static str| {
            let db = &db;
            async move {
                resources::find(&db.read, "juice.transfer", id)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let start = time::now();
        let later = |secs| start + chrono::Duration::seconds(secs);
        put_at(bulk("executing", "processing"), start).await;
        let first = (row("it_1").await, row("it_2").await);
        assert_eq!(first.0.next_reconcile_at, None, "fetched with its bulk");

        let again = put_at(bulk("executing", "processing"), later(60)).await;
        assert_eq!(again.rids.len(), 3, "every resource looked at is reported");
        assert_eq!(row("it_1").await.last_observed_at, first.0.last_observed_at);
        assert_eq!(row("it_2").await.last_observed_at, first.1.last_observed_at);
        let stored = resources::find(&db.read, "juice.bulk_transfer", "bt_1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.last_observed_at, Some(time::fmt(later(60))));
        let snapshot: serde_json::Value =
            serde_json::from_str(stored.snapshot.as_deref().unwrap()).unwrap();
        assert_eq!(
            snapshot["items"],
            json!([{"amount": 300, "status": "processing"}]),
            "only the item with no key of its own stays in the bulk's snapshot"
        );

        let moved = put_at(bulk("executing", "completed"), later(120)).await;
        assert_eq!(moved.transitions.len(), 1);
        assert_eq!(row("it_1").await.last_observed_at, first.0.last_observed_at);
        assert_eq!(
            row("it_2").await.last_observed_at,
            Some(time::fmt(later(120)))
        );

        // The bulk transfer rests, one item still moves: that one gets a
        // time of its own.
        put_at(bulk("completed", "completed"), later(180)).await;
        let it1 = row("it_1").await;
        assert_eq!(it1.last_observed_at, Some(time::fmt(later(180))));
        assert!(it1.next_reconcile_at.is_some());
        assert_eq!(row("it_2").await.next_reconcile_at, None);
    }
}
