//! Alerts: rules raise them in the same transaction as the observation that
//! triggers them; an outbox delivers them at least once to every sink.
//!
//! `rules` (called from `pipeline::record` and the worker) and `scan` (time
//! based rules, periodic) decide; [`raise`] / [`resolve`] write the alert and
//! its outbox rows; `outbox` hands each row to its sink (`sinks`).

pub mod outbox;
pub mod rules;
pub mod scan;
pub mod signing;
pub mod sinks;

use crate::config::Config;
use crate::store::alerts::{self as sql, Alert, AlertKey, NewAlert, RaiseOutcome};
use crate::store::Tx;

/// Rule names, as stored in `alerts.rule` and sent as `type`.
pub const PARTIAL_CANCELLATION: &str = "partial_cancellation";
pub const CANCEL_NOT_EFFECTIVE: &str = "cancel_not_effective";
pub const STUCK: &str = "stuck";
pub const REFUND_OVERDUE: &str = "refund_overdue";
pub const DEAD_LETTER: &str = "dead_letter";
pub const VERIFICATION_FAILURES: &str = "verification_failures";

/// Spawns the alert scanner and one outbox delivery loop per sink into
/// `tasks`; they stop when `app.shutdown` fires.
pub fn spawn(app: &crate::App, tasks: &mut tokio::task::JoinSet<()>) {
    tasks.spawn(scan::run(
        app.db.clone(),
        app.config.clone(),
        app.shutdown.clone(),
    ));
    outbox::spawn(&app.db, &app.config, &app.shutdown, tasks);
}

/// Rank of a severity: info < warning < critical (unknown ranks lowest).
pub fn severity_rank(severity: &str) -> u8 {
    match severity {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    }
}

/// Names of the sinks an alert of `rule` at `severity` goes to: those whose
/// `rules` list is empty or names the rule, and whose `min_severity` it meets.
pub fn route(config: &Config, rule: &str, severity: &str) -> Vec<String> {
    config
        .alerts
        .sinks
        .iter()
        .enumerate()
        .filter(|(_, s)| s.rules.is_empty() || s.rules.iter().any(|r| r == rule))
        .filter(|(_, s)| severity_rank(severity) >= severity_rank(&s.min_severity))
        .map(|(i, _)| config.sink_name(i))
        .collect()
}

/// An alert raised (a new version) or resolved inside a transaction, noted
/// in the transaction's [`Changes`] for whoever commits it to [`report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub id: String,
    pub rule: String,
    pub version: i64,
    pub resource_id: String,
    /// Resolved, rather than raised.
    pub resolved: bool,
}

impl Changed {
    fn of(a: &Alert, resolved: bool) -> Changed {
        Changed {
            id: a.id.clone(),
            rule: a.rule.clone(),
            version: a.version,
            resource_id: a.resource_id.clone(),
            resolved,
        }
    }
}

/// The alerts one transaction raised or resolved so far.
pub type Changes = Vec<Changed>;

/// Counts (`cancelwatch_alerts_raised_total`) and logs alerts raised or
/// resolved in a transaction that committed: counted before, a transaction
/// rolled back (or written again after a failure) would count them though
/// they were not kept, or twice.
pub fn report(changes: &[Changed]) {
    for c in changes {
        if c.resolved {
            tracing::info!(alert = %c.id, rule = %c.rule, resource = %c.resource_id, "alert resolved");
        } else {
            metrics::counter!("cancelwatch_alerts_raised_total", "rule" => c.rule.clone())
                .increment(1);
            tracing::info!(alert = %c.id, rule = %c.rule, version = c.version, resource = %c.resource_id, "alert raised");
        }
    }
}

/// Raises (creates or updates) an alert and queues each new version for its
/// sinks, inside the caller's transaction; a new version is noted in `changes`.
pub async fn raise(
    tx: &mut Tx<'_>,
    config: &Config,
    alert: &NewAlert,
    now: &str,
    changes: &mut Changes,
) -> Result<RaiseOutcome, sqlx::Error> {
    let sinks = route(config, &alert.rule, &alert.severity);
    let outcome = sql::raise(tx, alert, &sinks, now).await?;
    if !matches!(outcome, RaiseOutcome::Unchanged(_)) {
        changes.push(Changed::of(outcome.alert(), false));
    }
    Ok(outcome)
}

/// Resolves the open alert of `key`, if any, and queues the resolved
/// version; noted in `changes`.
pub async fn resolve(
    tx: &mut Tx<'_>,
    config: &Config,
    key: &AlertKey,
    now: &str,
    changes: &mut Changes,
) -> Result<Option<Alert>, sqlx::Error> {
    let Some(open) = sql::find(tx, key).await?.filter(|a| a.state == "open") else {
        return Ok(None);
    };
    let sinks = route(config, &key.rule, &open.severity);
    let resolved = sql::resolve(tx, key, &sinks, now).await?;
    if let Some(a) = &resolved {
        changes.push(Changed::of(a, true));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SinkConfig;

    /// Raising and resolving count and log nothing: they are noted in the
    /// transaction's changes, which whoever commits reports ([`report`]), so
    /// a transaction rolled back, or a batch written again after a
    /// failure, is not counted.
    #[test]
    fn alerts_are_counted_only_when_reported() {
        crate::metrics::with_local_metrics(|counted| async move {
            let dir = tempfile::tempdir().unwrap();
            let config = Config::default();
            let db = crate::store::Db::open(&dir.path().join("cw.db"), &config.database)
                .await
                .unwrap();
            let alert = NewAlert {
                rule: PARTIAL_CANCELLATION.into(),
                severity: "critical".into(),
                provider: "juice".into(),
                kind: "juice.bulk_transfer".into(),
                resource_id: "bt_1".into(),
                summary: "1 of 2 items cancelled".into(),
                details: serde_json::json!({}),
            };
            let mut changes = Changes::new();
            let mut tx = db.write.begin().await.unwrap();
            raise(
                &mut tx,
                &config,
                &alert,
                "2026-11-23T00:00:00Z",
                &mut changes,
            )
            .await
            .unwrap();
            resolve(
                &mut tx,
                &config,
                &alert.key(),
                "2026-11-23T00:01:00Z",
                &mut changes,
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
            let noted: Vec<(&str, i64, bool)> = changes
                .iter()
                .map(|c| (c.rule.as_str(), c.version, c.resolved))
                .collect();
            assert_eq!(
                noted,
                [
                    (PARTIAL_CANCELLATION, 1, false),
                    (PARTIAL_CANCELLATION, 2, true)
                ]
            );
            assert!(!counted.render().contains("cancelwatch_alerts_raised_total"));
            report(&changes);
            let line = r#"cancelwatch_alerts_raised_total{rule="partial_cancellation"} 1"#;
            assert!(counted.render().contains(line), "{}", counted.render());
            db.close().await;
        });
    }

    fn sink(name: &str, rules: &[&str], min: &str) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            kind: "log".into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
            min_severity: min.into(),
            ..SinkConfig::default()
        }
    }

    #[test]
    fn routing_by_rule_and_severity() {
        let mut config = Config::default();
        config.alerts.sinks = vec![
            sink("all", &[], "info"),
            sink("partial-only", &[PARTIAL_CANCELLATION], "info"),
            sink("critical", &[], "critical"),
            SinkConfig {
                kind: "log".into(),
                min_severity: "warning".into(),
                ..SinkConfig::default()
            },
        ];
        assert_eq!(
            route(&config, PARTIAL_CANCELLATION, "critical"),
            vec!["all", "partial-only", "critical", "log-3"]
        );
        assert_eq!(route(&config, STUCK, "warning"), vec!["all", "log-3"]);
        assert_eq!(route(&config, STUCK, "info"), vec!["all"]);
        config.alerts.sinks.clear();
        assert!(route(&config, STUCK, "critical").is_empty());
    }

    #[test]
    fn severity_order() {
        assert!(severity_rank("critical") > severity_rank("warning"));
        assert!(severity_rank("warning") > severity_rank("info"));
    }

    #[test]
    fn payload_has_the_contract_fields() {
        let alert = Alert {
            id: "alrt_1".into(),
            rule: STUCK.into(),
            severity: "warning".into(),
            provider: "stripe".into(),
            kind: "stripe.outbound_transfer".into(),
            resource_id: "obt_1".into(),
            summary: "stuck".into(),
            details: r#"{"status":"processing"}"#.into(),
            state: "open".into(),
            version: 2,
            created_at: "2026-10-30T12:00:00.000Z".into(),
            updated_at: "2026-10-30T12:05:00.000Z".into(),
            resolved_at: None,
        };
        let p = alert.payload();
        assert_eq!(p["id"], "alrt_1");
        assert_eq!(p["type"], "stuck");
        assert_eq!(p["severity"], "warning");
        assert_eq!(
            p["resource"],
            serde_json::json!({"provider": "stripe", "kind": "stripe.outbound_transfer", "id": "obt_1"})
        );
        assert_eq!(p["summary"], "stuck");
        assert_eq!(p["details"]["status"], "processing");
        assert_eq!(p["created_at"], "2026-10-30T12:00:00.000Z");
        assert_eq!(p["updated_at"], "2026-10-30T12:05:00.000Z");
        assert_eq!(p["state"], "open");
        assert_eq!(p["version"], 2);
    }
}
