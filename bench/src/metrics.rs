//! What the daemon says of itself on `/metrics` (Prometheus text).

use crate::report::WriterUse;

/// The daemon's `/metrics` text; empty when it cannot be read.
pub async fn daemon_metrics(url: &str) -> String {
    match reqwest::get(format!("{url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// From the daemon's metrics: per use, the share of `seconds` it held the
/// writer connection, and the p99 of one hold.
pub fn writer_uses(metrics: &str, seconds: f64) -> Vec<WriterUse> {
    parse_writer_hold(metrics)
        .into_iter()
        .map(|(what, held, holds)| WriterUse {
            share: held / seconds.max(f64::MIN_POSITIVE),
            held,
            holds,
            hold_p99_ms: quantile_bound_ms(
                metrics,
                "cancelwatch_writer_hold_seconds",
                Some(("use", what.as_str())),
                0.99,
            ),
            what,
        })
        .collect()
}

/// The upper bound, in ms, of the `cancelwatch_ack_seconds` bucket that
/// holds the 99th percentile (all providers together); `None` without
/// acknowledgements, or when it lies past the last finite bucket.
pub fn ack_p99_bound_ms(metrics: &str) -> Option<f64> {
    quantile_bound_ms(metrics, "cancelwatch_ack_seconds", None, 0.99)
}

/// The value of counter `name`, summed over its series; `None` when the
/// daemon does not report it.
pub fn counter(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The `step` labels of `cancelwatch_ack_step_seconds`, in the order an
/// acknowledgement goes through them in the daemon's group commit.
const ACK_STEPS: [&str; 5] = ["queued", "writer", "insert", "sync", "answer"];

/// Per step of an acknowledgement in the daemon, the upper bounds in ms of
/// the buckets that hold its median and its 99th percentile.
pub fn ack_step_bounds_ms(metrics: &str) -> Vec<(&'static str, Option<f64>, Option<f64>)> {
    let metric = "cancelwatch_ack_step_seconds";
    ACK_STEPS
        .into_iter()
        .map(|step| {
            let only = Some(("step", step));
            (
                step,
                quantile_bound_ms(metrics, metric, only, 0.50),
                quantile_bound_ms(metrics, metric, only, 0.99),
            )
        })
        .filter(|(_, p50, _)| p50.is_some())
        .collect()
}

/// The upper bound, in ms, of the bucket of histogram `metric` that holds
/// its `q`-quantile, over the series that carry label `only` (or all
/// series); `None` without samples, or when it lies past the last finite
/// bucket.
fn quantile_bound_ms(
    metrics: &str,
    metric: &str,
    only: Option<(&str, &str)>,
    q: f64,
) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{");
    let wanted = only.map(|(name, value)| format!("{name}=\"{value}\""));
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, count)) = rest.split_once("} ") else {
            continue;
        };
        if let Some(wanted) = &wanted {
            if !labels.split(',').any(|label| label == wanted) {
                continue;
            }
        }
        let Some(le) = labels
            .split(',')
            .find_map(|label| label.strip_prefix("le=\""))
            .and_then(|v| v.strip_suffix('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(le) => le,
                Err(_) => continue,
            }
        };
        let Ok(count) = count.trim().parse::<f64>() else {
            continue;
        };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let all = buckets.last()?.1;
    if all <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= all * q)
        .map(|(bound, _)| *bound * 1000.0)
        .filter(|ms| ms.is_finite())
}

/// `(use, seconds, holds)` of each use of the writer connection, from the
/// `cancelwatch_writer_hold_seconds` histogram's `_sum` and `_count` lines,
/// in the order of the `_sum` lines.
fn parse_writer_hold(metrics: &str) -> Vec<(String, f64, u64)> {
    let of = |suffix: &str, line: &str| -> Option<(String, String)> {
        let rest = line
            .strip_prefix("cancelwatch_writer_hold_seconds")?
            .strip_prefix(suffix)?
            .strip_prefix("{use=\"")?;
        let (what, value) = rest.split_once("\"} ")?;
        Some((what.to_string(), value.trim().to_string()))
    };
    let counts: Vec<(String, String)> = metrics.lines().filter_map(|l| of("_count", l)).collect();
    metrics
        .lines()
        .filter_map(|line| {
            let (what, sum) = of("_sum", line)?;
            let holds = counts
                .iter()
                .find(|(w, _)| *w == what)
                .and_then(|(_, n)| n.parse::<f64>().ok())
                .map_or(0, |n| n as u64);
            Some((what, sum.parse().ok()?, holds))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_hold_sums_are_read_from_prometheus_text() {
        let text = "# TYPE cancelwatch_writer_hold_seconds histogram\n\
            cancelwatch_writer_hold_seconds_bucket{use=\"claim\",le=\"0.001\"} 3\n\
            cancelwatch_writer_hold_seconds_sum{use=\"claim\"} 0.25\n\
            cancelwatch_writer_hold_seconds_count{use=\"claim\"} 9\n\
            cancelwatch_writer_hold_seconds_sum{use=\"record\"} 1.5\n\
            cancelwatch_inbox_depth 4\n";
        assert_eq!(
            parse_writer_hold(text),
            vec![
                ("claim".to_string(), 0.25, 9),
                ("record".to_string(), 1.5, 0)
            ]
        );
    }

    #[test]
    fn the_daemons_ack_p99_is_read_from_its_histogram_buckets() {
        let text = "# TYPE cancelwatch_ack_seconds histogram\n\
            cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"0.001\"} 500\n\
            cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"0.0025\"} 980\n\
            cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"0.005\"} 995\n\
            cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"+Inf\"} 1000\n\
            cancelwatch_ack_seconds_bucket{provider=\"juice\",le=\"0.001\"} 0\n\
            cancelwatch_ack_seconds_bucket{provider=\"juice\",le=\"0.0025\"} 0\n\
            cancelwatch_ack_seconds_bucket{provider=\"juice\",le=\"0.005\"} 0\n\
            cancelwatch_ack_seconds_bucket{provider=\"juice\",le=\"+Inf\"} 0\n\
            cancelwatch_ack_seconds_sum{provider=\"stripe\"} 1.2\n";
        // 99% of 1,000 is 990: past the 2.5 ms bucket (980), within 5 ms.
        assert_eq!(ack_p99_bound_ms(text), Some(5.0));
        assert_eq!(ack_p99_bound_ms("cancelwatch_inbox_depth 4\n"), None);
        let beyond = "cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"10\"} 1\n\
            cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"+Inf\"} 9\n";
        assert_eq!(
            ack_p99_bound_ms(beyond),
            None,
            "past the last finite bucket"
        );
    }

    #[test]
    fn each_ack_step_is_read_from_its_own_series() {
        let text = "cancelwatch_ack_step_seconds_bucket{step=\"writer\",le=\"0.001\"} 60\n\
            cancelwatch_ack_step_seconds_bucket{step=\"writer\",le=\"0.003\"} 99\n\
            cancelwatch_ack_step_seconds_bucket{step=\"writer\",le=\"+Inf\"} 100\n\
            cancelwatch_ack_step_seconds_bucket{step=\"sync\",le=\"0.001\"} 0\n\
            cancelwatch_ack_step_seconds_bucket{step=\"sync\",le=\"0.003\"} 40\n\
            cancelwatch_ack_step_seconds_bucket{step=\"sync\",le=\"0.01\"} 100\n\
            cancelwatch_ack_step_seconds_bucket{step=\"sync\",le=\"+Inf\"} 100\n";
        // In the order of the commit; steps without samples are left out.
        assert_eq!(
            ack_step_bounds_ms(text),
            vec![
                ("writer", Some(1.0), Some(3.0)),
                ("sync", Some(10.0), Some(10.0))
            ]
        );
    }
}
