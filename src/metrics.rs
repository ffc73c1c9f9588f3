//! Prometheus metrics. The recorder is process-wide, so several daemons in
//! one test process share it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histogram buckets, in seconds, for times compared with milliseconds.
const FINE: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .expect("static buckets are valid")
                // Acknowledgement times and their steps, and how long each
                // use holds the writer (which an acknowledgement may wait
                // behind), where the acknowledgement target (10 ms at the 99th
                // percentile) needs finer buckets than the default.
                .set_buckets_for_metric(Matcher::Prefix("cancelwatch_ack_".into()), FINE)
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("cancelwatch_writer_hold_seconds".into()),
                    FINE,
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            spawn_upkeep(handle.clone());
            // Another recorder may already be installed (a host program's); then
            // ours only renders what it was given.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until something folds them
/// into their buckets, which rendering `/metrics` does: without a scrape,
/// memory grew with each delivery. The exporter's own upkeep task comes only
/// with its HTTP listener, which the daemon does not use (it serves
/// `/metrics` itself), so a thread of ours does the same.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep: histogram samples wait for a scrape");
    }
}

/// Every series, with the `# HELP` line it is rendered with.
const SERIES: &[(&str, &str)] = &[
    (
        "cancelwatch_deliveries_received_total",
        "Verified deliveries taken into the inbox, by provider.",
    ),
    (
        "cancelwatch_deliveries_duplicate_total",
        "Deliveries answered as duplicates (stored before), by provider.",
    ),
    (
        "cancelwatch_deliveries_refused_total",
        "Deliveries refused (signature, size, shape), by provider and reason.",
    ),
    (
        "cancelwatch_deliveries_dead_total",
        "Deliveries given up after their last attempt, by provider.",
    ),
    (
        "cancelwatch_deliveries_rate_limited_total",
        "Attempts put off because the provider rate-limited us, by provider.",
    ),
    (
        "cancelwatch_refusal_records_dropped_total",
        "Refusal records not kept because the inbox queue was full.",
    ),
    (
        "cancelwatch_inbox_handed_over_total",
        "New deliveries leased by the commit that stored them.",
    ),
    (
        "cancelwatch_transitions_total",
        "Status transitions recorded, by kind and new status.",
    ),
    (
        "cancelwatch_alerts_raised_total",
        "Alert versions raised, by rule.",
    ),
    (
        "cancelwatch_alert_delivery_failures_total",
        "Failed attempts to deliver an alert, by sink.",
    ),
    (
        "cancelwatch_backfill_events_total",
        "Events a backfill took into the inbox, by provider.",
    ),
    (
        "cancelwatch_fetch_errors_total",
        "Provider calls that failed, by provider and reason.",
    ),
    (
        "cancelwatch_http_requests_queued_total",
        "Requests that waited for one of the server.max_concurrent_requests slots.",
    ),
    (
        "cancelwatch_http_refusals_total",
        "Requests answered 408, 413 or 431 (too slow, too large), by status.",
    ),
    (
        "cancelwatch_connections_refused_total",
        "Connections closed at once because their address held its share, by reason.",
    ),
    (
        "cancelwatch_connections_evicted_total",
        "Idle connections closed to make room at server.max_connections.",
    ),
    (
        "cancelwatch_connections_cut_total",
        "Connections ended by a server deadline (headers, writing an answer), by reason.",
    ),
    (
        "cancelwatch_admin_auth_failures_total",
        "Failed /v1 authentications, by result (refused, or throttled unchecked).",
    ),
    (
        "cancelwatch_accept_errors_total",
        "Failed accepts of a connection (out of file descriptors and the like).",
    ),
    ("cancelwatch_reconcile_runs_total", "Reconcile passes run."),
    (
        "cancelwatch_unkeyed_items_total",
        "Items a provider answered that could be keyed by neither id nor reference.",
    ),
    (
        "cancelwatch_deliveries_dead",
        "Deliveries in the dead state now.",
    ),
    (
        "cancelwatch_inbox_deliveries",
        "Deliveries in the inbox now, by state.",
    ),
    (
        "cancelwatch_inbox_depth",
        "Deliveries waiting to be processed now.",
    ),
    (
        "cancelwatch_inbox_oldest_pending_seconds",
        "Age of the oldest delivery waiting to be processed.",
    ),
    ("cancelwatch_ready", "1 while /readyz answers 200, else 0."),
    (
        "cancelwatch_leader",
        "1 while this replica runs the reconciler, the scans, the outbox and the pruner (always on SQLite).",
    ),
    (
        "cancelwatch_http_responses_total",
        "HTTP answers, by route (its pattern, `other` when none matched) and status class.",
    ),
    (
        "cancelwatch_alert_outbox_pending",
        "Alert deliveries waiting to go out now, by sink.",
    ),
    (
        "cancelwatch_alert_outbox_oldest_pending_seconds",
        "Age of the oldest alert delivery waiting to go out, by sink (0 when none waits).",
    ),
    ("cancelwatch_alerts_open", "Open alerts now, by rule."),
    (
        "cancelwatch_ack_seconds",
        "Time from a delivery's arrival to its acknowledgement.",
    ),
    (
        "cancelwatch_ack_step_seconds",
        "Time an acknowledgement spent in each step of the group commit.",
    ),
    (
        "cancelwatch_fetch_seconds",
        "Time of each provider fetch, by provider.",
    ),
    (
        "cancelwatch_inbox_batch_size",
        "Jobs per group commit of the inbox.",
    ),
    (
        "cancelwatch_writer_hold_seconds",
        "Time the writer connection is held, by use.",
    ),
    (
        "cancelwatch_slow_calls_cut_total",
        "Attempts ended because their provider call ran past workers.slow_call_secs while the provider's slow lane was full, by provider.",
    ),
    (
        "cancelwatch_wal_frames_behind",
        "WAL frames the last checkpoint could not copy: above 0 for long, a reader (an open read transaction elsewhere) holds checkpoints back and the WAL grows.",
    ),
    (
        "cancelwatch_wal_syncs_total",
        "Syncs of the SQLite WAL to disk made for acknowledgements (synchronous = full).",
    ),
    (
        "cancelwatch_wal_syncs_shared_total",
        "Groups of acknowledgements made durable by a sync another group began after their commit, without one of their own.",
    ),
    (
        "cancelwatch_database_writable",
        "0 while writes fail for a cause outside the daemon (disk full, unwritable files, a lock held elsewhere), 1 once a write succeeds again.",
    ),
    (
        "cancelwatch_database_write_failures_total",
        "Writes that failed for a cause outside the daemon, by cause (disk_full, database_busy, database_io).",
    ),
];

/// The series of [`SERIES`] that are histograms (the rest are counters,
/// named `_total`, and gauges).
const HISTOGRAMS: [&str; 5] = [
    "cancelwatch_ack_seconds",
    "cancelwatch_ack_step_seconds",
    "cancelwatch_fetch_seconds",
    "cancelwatch_inbox_batch_size",
    "cancelwatch_writer_hold_seconds",
];

/// The `# HELP` of every series, and `cancelwatch_build_info`, whose labels
/// say which build answers.
fn describe() {
    for &(name, help) in SERIES {
        match name {
            n if n.ends_with("_total") => metrics::describe_counter!(n, help),
            n if HISTOGRAMS.contains(&n) => metrics::describe_histogram!(n, help),
            n => metrics::describe_gauge!(n, help),
        }
    }
    metrics::describe_gauge!(
        "cancelwatch_build_info",
        "Always 1; the labels name the version and the commit it was built from."
    );
    metrics::gauge!(
        "cancelwatch_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("GIT_COMMIT_OF_CANCELWATCH"),
    )
    .set(1.0);
}

/// Every counter whose labels are known before anything happens, at zero,
/// so that a scrape shows it from the start and `rate()` and `increase()`
/// see its first increment (a series that appears at 1 loses it).
pub fn start_at_zero(config: &crate::config::Config) {
    use crate::providers::{http::FETCH_ERROR_REASONS, knowledge, REFUSAL_CODES};
    let zero = |c: metrics::Counter| c.increment(0);
    for provider in knowledge::names() {
        for name in [
            "cancelwatch_deliveries_received_total",
            "cancelwatch_deliveries_duplicate_total",
            "cancelwatch_deliveries_dead_total",
            "cancelwatch_deliveries_rate_limited_total",
            "cancelwatch_backfill_events_total",
        ] {
            zero(metrics::counter!(name, "provider" => provider));
        }
        for reason in REFUSAL_CODES {
            zero(
                metrics::counter!("cancelwatch_deliveries_refused_total", "provider" => provider, "reason" => reason),
            );
        }
        for reason in FETCH_ERROR_REASONS {
            zero(
                metrics::counter!("cancelwatch_fetch_errors_total", "provider" => provider, "reason" => reason),
            );
        }
    }
    for kind in knowledge::all().iter().flat_map(|k| k.kinds()) {
        for status in kind.statuses {
            zero(
                metrics::counter!("cancelwatch_transitions_total", "kind" => kind.kind, "to_status" => *status),
            );
        }
    }
    for rule in crate::store::model::ALERT_TYPES {
        zero(metrics::counter!("cancelwatch_alerts_raised_total", "rule" => rule));
    }
    for i in 0..config.alerts.sinks.len() {
        zero(
            metrics::counter!("cancelwatch_alert_delivery_failures_total", "sink" => config.sink_name(i)),
        );
    }
    for name in [
        "cancelwatch_reconcile_runs_total",
        "cancelwatch_refusal_records_dropped_total",
        "cancelwatch_inbox_handed_over_total",
    ] {
        zero(metrics::counter!(name));
    }
    zero(
        metrics::counter!("cancelwatch_unkeyed_items_total", "provider" => crate::providers::juice::NAME),
    );
    for route in crate::api::COUNTED_ROUTES {
        for class in crate::api::STATUS_CLASSES {
            zero(
                metrics::counter!("cancelwatch_http_responses_total", "route" => route, "class" => class),
            );
        }
    }
}

/// The process's own series (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`,
/// `process_start_time_seconds`, …, in Prometheus's usual names), read
/// from the system at each scrape.
pub fn collect_process() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR
        .get_or_init(|| {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        })
        .collect();
}

/// Runs `test` on a runtime of its own with a metrics recorder of its own
/// (not the process-wide one, which other tests share); `test` gets the
/// handle that renders what was counted.
#[cfg(test)]
pub(crate) fn with_local_metrics<F, Fut>(test: F)
where
    F: FnOnce(PrometheusHandle) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let recorder = PrometheusBuilder::new().build_recorder();
    let counted = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a test runtime");
    metrics::with_local_recorder(&recorder, || rt.block_on(test(counted)));
}
