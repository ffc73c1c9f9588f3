//! Memory of the metrics recorder when nobody scrapes `/metrics`: records
//! histogram samples as deliveries do (acknowledgement times), never renders,
//! and reports this process's resident memory before and after. `daemon`
//! uses the daemon's recorder (`cancelwatch::metrics::handle`, with its
//! upkeep); `bare` a recorder built the same way without upkeep, for
//! comparison.
//!
//! ```sh
//! cargo run --release -p cancelwatch-bench --bin metrics_memory -- daemon 5000000
//! cargo run --release -p cancelwatch-bench --bin metrics_memory -- bare 5000000
//! ```
//!
//! Bounded: it records the given number of samples (at most 50 million)
//! over about 20 s.

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("daemon");
    let samples: u64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5_000_000);
    anyhow::ensure!(samples <= 50_000_000, "at most 50 million samples");
    // Spread over 20 s, a tenth at a time, as deliveries arrive over time.
    let record = || {
        let tenth = samples / 10;
        for i in 0..samples {
            metrics::histogram!("cancelwatch_ack_seconds", "provider" => "stripe")
                .record((i % 1000) as f64 / 100_000.0);
            if tenth > 0 && i % tenth == tenth - 1 {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    let before = rss_kib();
    match which {
        "daemon" => {
            let _handle = cancelwatch::metrics::handle();
            record();
        }
        "bare" => {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            metrics::with_local_recorder(&recorder, record);
        }
        other => anyhow::bail!("{other:?}: daemon or bare"),
    }
    let after = rss_kib();
    println!(
        "{which}: {samples} histogram samples over 20 s, no scrape: RSS {} MiB before, {} MiB after (+{} MiB)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    Ok(())
}

/// This process's resident memory, from `/proc`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
