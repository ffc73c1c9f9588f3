//! Observations recorded together (`record_all`): the transitions,
//! refunds and progress each would get on its own.

use cancelwatch::domain;
use cancelwatch::pipeline::Context;

use super::offline_context;
use crate::support::db::{self, sqlite_engine};
use crate::support::Engine;

/// An observation of a resource as a fetch makes it (100 USD, test mode).
pub(super) fn observation(
    kind: &str,
    id: &str,
    status: &str,
    children: Vec<cancelwatch::providers::Observation>,
) -> cancelwatch::providers::Observation {
    use cancelwatch::providers::{classify, Observation};
    let provider = if kind.starts_with("juice.") {
        "juice"
    } else {
        "stripe"
    };
    Observation {
        provider,
        kind: kind.into(),
        id: id.into(),
        parent_id: None,
        status: status.into(),
        class: classify(kind, status, &[]),
        provider_at: None,
        amount: Some(100),
        currency: Some("usd".into()),
        livemode: Some(false),
        snapshot: serde_json::json!({"id": id, "status": status}).to_string(),
        progress: None,
        children,
        refund: None,
    }
}

/// Records the observations in one call of `record_all` and commits; the
/// n-th is triggered by the event `{prefix}_{n}`.
async fn record_together(
    ctx: &Context,
    observations: &[cancelwatch::providers::Observation],
    prefix: &str,
) -> Vec<domain::observe::Recorded> {
    use cancelwatch::domain::observe::{ToRecord, Trigger};
    use cancelwatch::store::sqlite::record;
    let triggers: Vec<Trigger> = (0..observations.len())
        .map(|n| Trigger::event(format!("{prefix}_{n}")))
        .collect();
    let items: Vec<ToRecord> = observations
        .iter()
        .zip(&triggers)
        .map(|(obs, trigger)| ToRecord {
            obs,
            trigger,
            context: None,
        })
        .collect();
    let mut tx = sqlite_engine(&ctx.store).write.begin().await.unwrap();
    let now = cancelwatch::time::now();
    let recorded = record::record_all(&mut tx, &ctx.config, &items, now, &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    recorded
}

/// Many observations recorded together: each resource's transitions are
/// those it would get one observation at a time, also when two observations
/// of one resource share a call (they are recorded in turn), and a stale
/// one moves nothing.
#[tokio::test]
async fn observations_recorded_together_match_one_at_a_time() {
    use cancelwatch::domain::observe::{ToRecord, Trigger};
    use cancelwatch::store::sqlite::record;
    let (_config, ctx) = offline_context(Engine::Sqlite).await;
    let obt = "stripe.outbound_transfer";
    let mut item = observation("juice.transfer", "it_1", "cancelled", vec![]);
    item.parent_id = Some("bulk_1".into());
    let observations = [
        observation(obt, "obt_a", "processing", vec![]),
        observation(obt, "obt_b", "processing", vec![]),
        // obt_a again, later: recorded after the first, in the same call.
        observation(obt, "obt_a", "canceled", vec![]),
        observation("juice.bulk_transfer", "bulk_1", "cancelled", vec![item]),
    ];
    let recorded = record_together(&ctx, &observations, "evt").await;
    let counts: Vec<(usize, bool, usize)> = recorded
        .iter()
        .map(|r| (r.transitions.len(), r.stale, r.rids.len()))
        .collect();
    assert_eq!(
        counts,
        vec![(1, false, 1), (1, false, 1), (1, false, 1), (2, false, 2)]
    );
    let history = |id: &'static str| {
        let ctx = &ctx;
        async move {
            db::transitions_of(ctx, id)
                .await
                .into_iter()
                .map(|t| (t.from_status, t.to_status, t.trigger_id))
                .collect::<Vec<_>>()
        }
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        history("obt_a").await,
        vec![
            (None, "processing".into(), some("evt_0")),
            (some("processing"), "canceled".into(), some("evt_2")),
        ]
    );
    assert_eq!(
        history("it_1").await,
        vec![(None, "cancelled".into(), some("evt_3"))]
    );
    let item_row = db::resource(&ctx, "juice.transfer", "it_1").await.unwrap();
    assert_eq!(item_row.parent_id.as_deref(), Some("bulk_1"));

    // A late `processing` of obt_a is stale: canceled is final.
    let late = observation(obt, "obt_a", "processing", vec![]);
    let trigger = Trigger::event("evt_late");
    let mut tx = sqlite_engine(&ctx.store).write.begin().await.unwrap();
    let recorded = record::record_all(
        &mut tx,
        &ctx.config,
        &[ToRecord {
            obs: &late,
            trigger: &trigger,
            context: None,
        }],
        cancelwatch::time::now(),
        &mut Vec::new(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(recorded[0].stale);
    assert!(recorded[0].transitions.is_empty());
    assert_eq!(history("obt_a").await.len(), 2);
    let row = db::resource(&ctx, obt, "obt_a").await.unwrap();
    assert_eq!(row.status.as_deref(), Some("canceled"));
    ctx.store.close().await;
}

/// Refunds and progress of many observations are written together: each
/// resource gets the refund and progress rows it would get on its own,
/// opened in one call and settled in the next.
#[tokio::test]
async fn refunds_and_progress_recorded_together() {
    use cancelwatch::providers::{Progress, RefundSignal, RefundStatus};
    let (_config, ctx) = offline_context(Engine::Sqlite).await;
    let obt = "stripe.outbound_transfer";
    let with_refund = |id: &str, status: &str, refund: RefundStatus| {
        let mut obs = observation(obt, id, status, vec![]);
        obs.refund = Some(RefundSignal {
            status: refund,
            reason: status.into(),
            amount: Some(100),
            currency: Some("usd".into()),
        });
        obs
    };
    let with_progress = |id: &str, status: &str, success: i64| {
        let mut obs = observation("stripe.batch_job", id, status, vec![]);
        obs.progress = Some(Progress {
            success: Some(success),
            failure: Some(0),
            validated: None,
        });
        obs
    };
    record_together(
        &ctx,
        &[
            with_refund("obt_p", "canceled", RefundStatus::Pending),
            with_refund("obt_q", "canceled", RefundStatus::Pending),
            with_refund("obt_r", "returned", RefundStatus::Completed),
            with_progress("batchv2_1", "cancelling", 3),
            with_progress("batchv2_2", "processing", 5),
        ],
        "evt_1",
    )
    .await;
    record_together(
        &ctx,
        &[
            with_refund("obt_p", "canceled", RefundStatus::Completed),
            with_refund("obt_q", "canceled", RefundStatus::Failed),
            with_progress("batchv2_1", "canceled", 4),
        ],
        "evt_2",
    )
    .await;
    let refunds: Vec<(String, String, Option<String>, Option<String>)> = db::refunds(&ctx)
        .await
        .into_iter()
        .map(|r| {
            let completed = r.completed_at.map(|_| "set".to_string());
            (r.resource_id, r.status, r.trigger_id, completed)
        })
        .collect();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        refunds,
        vec![
            (
                "obt_p".into(),
                "completed".into(),
                some("evt_2_0"),
                some("set")
            ),
            ("obt_q".into(), "failed".into(), some("evt_2_1"), None),
            (
                "obt_r".into(),
                "completed".into(),
                some("evt_1_2"),
                some("set")
            ),
        ]
    );
    let progress = db::progress_rows(&ctx).await;
    assert_eq!(
        progress,
        vec![
            (
                "batchv2_1".into(),
                "cancelling".into(),
                Some(3),
                "evt_1_3".into()
            ),
            (
                "batchv2_2".into(),
                "processing".into(),
                Some(5),
                "evt_1_4".into()
            ),
            (
                "batchv2_1".into(),
                "canceled".into(),
                Some(4),
                "evt_2_2".into()
            ),
        ]
    );
    ctx.store.close().await;
}
