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
            // Another recorder may already be installed (a host program's); then
            // ours only renders what it was given.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
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
