//! What a run measured, and how it is printed.

use crate::daemon::CpuTime;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub label: String,
    pub seconds: f64,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub errors: u64,
    pub latencies_us: Vec<u64>,
    pub peak_rss_kib: Option<u64>,
    /// The most threads the daemon had, sampled every 100 ms during the run.
    pub peak_threads: Option<u64>,
    /// End to end: per recorded transition, milliseconds from send to record.
    pub e2e_ms: Option<E2eReport>,
    /// Per use of the daemon's writer connection (acknowledge, claim, …),
    /// from its own metrics.
    pub writer_uses: Vec<WriterUse>,
    /// The daemon's own p99 acknowledgement time, in ms, as the upper bound
    /// of the bucket of its `cancelwatch_ack_seconds` histogram that holds
    /// it: what of `latencies_us` the daemon spent itself rather than the
    /// load generator's wait for a CPU or the network.
    pub daemon_ack_p99_ms: Option<f64>,
    /// Per step of the group commit (`queued`, `writer`, `insert`, `sync`,
    /// `answer`), the bucket bounds in ms of its p50 and p99, from the
    /// daemon's `cancelwatch_ack_step_seconds`.
    pub daemon_ack_steps: Vec<(&'static str, Option<f64>, Option<f64>)>,
    /// SQLite at `synchronous = full`: the syncs of the WAL and its size.
    pub wal: Option<WalFigures>,
    /// CPU time the daemon used from ready to the end of the run (and, end
    /// to end, until the last transition was recorded).
    pub daemon_cpu: Option<CpuTime>,
    /// CPU time this process (load generator and simulator) used meanwhile.
    pub bench_cpu: Option<CpuTime>,
}

/// The WAL over a run: syncs made (`cancelwatch_wal_syncs_total`), groups
/// of acknowledgements a sync begun after their commit covered
/// (`cancelwatch_wal_syncs_shared_total`), and the file's size at most
/// (sampled every 100 ms) and at the end.
#[derive(Debug, Clone, Copy)]
pub struct WalFigures {
    pub syncs: u64,
    pub shared: u64,
    pub most_bytes: u64,
    pub end_bytes: u64,
}

/// End to end: how long deliveries took from sent to recorded.
#[derive(Debug, Clone)]
pub struct E2eReport {
    pub recorded: usize,
    pub latencies_ms: Vec<u64>,
    /// Transitions recorded per second, first send to last record.
    pub per_second: f64,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.accepted as f64 / self.seconds
    }

    /// The q-quantile (0..=1) of the latencies, in milliseconds.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        percentile(&self.latencies_us, q) as f64 / 1000.0
    }

    pub fn print(&self) {
        println!("== {}", self.label);
        println!(
            "accepted {} in {:.1} s = {:.0}/s; duplicates {}, refused {}, errors {}",
            self.accepted,
            self.seconds,
            self.per_second(),
            self.duplicates,
            self.refused,
            self.errors
        );
        println!(
            "ack latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
            self.percentile_ms(0.999),
            self.percentile_ms(1.0)
        );
        if let Some(bound) = self.daemon_ack_p99_ms {
            println!(
                "  of which in the daemon (body read to answer ready): p99 at most {bound} ms"
            );
        }
        if !self.daemon_ack_steps.is_empty() {
            let ms = |bound: Option<f64>| bound.map_or("?".to_string(), |b| b.to_string());
            let steps: Vec<String> = self
                .daemon_ack_steps
                .iter()
                .map(|(step, p50, p99)| format!("{step} {}/{}", ms(*p50), ms(*p99)))
                .collect();
            println!("  its steps, p50/p99 at most (ms): {}", steps.join(", "));
        }
        if let Some(w) = &self.wal {
            println!(
                "WAL: {} syncs, {:.1} deliveries a sync; {} groups made durable by a sync begun after their commit; file at most {:.1} MiB, {:.1} MiB at the end",
                w.syncs,
                self.accepted as f64 / w.syncs.max(1) as f64,
                w.shared,
                w.most_bytes as f64 / 1048576.0,
                w.end_bytes as f64 / 1048576.0
            );
        }
        if let Some(e) = &self.e2e_ms {
            println!(
                "end to end: {} transitions recorded, {:.0}/s; delivery-to-recorded ms: p50 {}  p99 {}  p99.9 {}  max {}",
                e.recorded,
                e.per_second,
                percentile(&e.latencies_ms, 0.50),
                percentile(&e.latencies_ms, 0.99),
                percentile(&e.latencies_ms, 0.999),
                percentile(&e.latencies_ms, 1.0)
            );
        }
        if let Some(line) = self.writer_line() {
            println!("{line}");
        }
        if let (Some(daemon), Some(bench)) = (self.daemon_cpu, self.bench_cpu) {
            println!(
                "CPU: daemon {:.2} s (user {:.2}, system {:.2}) = {:.0} µs per delivery answered; load generator{} {:.2} s",
                daemon.total(),
                daemon.user,
                daemon.system,
                self.per_delivery_us(daemon.total()),
                if self.e2e_ms.is_some() { " and simulator" } else { "" },
                bench.total()
            );
        }
        match (self.peak_rss_kib, self.peak_threads) {
            (Some(kib), Some(threads)) => println!(
                "daemon peak RSS: {:.1} MiB; threads: at most {threads}",
                kib as f64 / 1024.0
            ),
            (Some(kib), None) => println!("daemon peak RSS: {:.1} MiB", kib as f64 / 1024.0),
            (None, _) => println!("daemon peak RSS: unknown (no /proc)"),
        }
    }

    /// The run's main figures on one line, to set runs side by side.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}: {:.0}/s accepted, ack p99 {:.1} ms",
            self.label,
            self.per_second(),
            self.percentile_ms(0.99)
        );
        if let Some(e) = &self.e2e_ms {
            line += &format!(
                "; {:.0}/s recorded, delivery-to-recorded p99 {} ms",
                e.per_second,
                percentile(&e.latencies_ms, 0.99)
            );
        }
        if let Some(cpu) = self.daemon_cpu {
            line += &format!(
                "; daemon CPU {:.0} µs a delivery",
                self.per_delivery_us(cpu.total())
            );
        }
        let share: f64 = self.writer_uses.iter().map(|u| u.share).sum();
        let held: f64 = self.writer_uses.iter().map(|u| u.held).sum();
        if !self.writer_uses.is_empty() {
            line += &format!(
                "; writer held {:.0}% ({:.0} µs a delivery)",
                share * 100.0,
                self.per_delivery_us(held)
            );
        }
        line
    }

    /// The share of the run each use held the writer connection, its time
    /// a delivery, deliveries answered a hold (a group commit's size, a
    /// claim's, a record turn's) and p99 hold; `None` without figures.
    fn writer_line(&self) -> Option<String> {
        if self.writer_uses.is_empty() {
            return None;
        }
        let shares: Vec<String> = self
            .writer_uses
            .iter()
            .map(|u| {
                let p99 = u
                    .hold_p99_ms
                    .map_or(String::new(), |ms| format!("; p99 hold ≤ {ms} ms"));
                // Of a use that barely held it (`other`: a prune, a
                // reconcile), the size says nothing.
                let each = match u.holds {
                    _ if u.share < 0.01 => String::new(),
                    0 => String::new(),
                    n => format!(
                        "; {:.0} deliveries a hold",
                        self.answered() as f64 / n as f64
                    ),
                };
                format!(
                    "{} {:.0}% ({:.0} µs a delivery{each}{p99})",
                    u.what,
                    u.share * 100.0,
                    self.per_delivery_us(u.held)
                )
            })
            .collect();
        Some(format!(
            "daemon writer connection held: {}",
            shares.join(", ")
        ))
    }

    /// `seconds` of the run spread over the deliveries the daemon answered
    /// (accepted, duplicate or refused: a forged flood is measured per
    /// refusal), in µs: unlike a share of the run, comparable between runs
    /// of other lengths and rates.
    fn per_delivery_us(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.answered().max(1) as f64
    }

    /// Deliveries answered: accepted, duplicate or refused.
    fn answered(&self) -> u64 {
        self.accepted + self.duplicates + self.refused
    }
}

/// Sorted-copy percentile; `q` = 1.0 is the maximum.
pub fn percentile(samples: &[u64], q: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One use of the daemon's writer connection, from its
/// `cancelwatch_writer_hold_seconds{use}` histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterUse {
    /// `acknowledge`, `claim`, `record`, `other`.
    pub what: String,
    /// The share of the run this use held the connection.
    pub share: f64,
    /// How long, in all, it held the connection, in seconds.
    pub held: f64,
    /// How many times it took the connection (an acknowledgement's group
    /// commit, a claim, a record turn).
    pub holds: u64,
    /// The bucket bound in ms of the p99 of one hold: how long an
    /// acknowledgement may wait behind one.
    pub hold_p99_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&s, 0.5), 500);
        assert_eq!(percentile(&s, 0.99), 990);
        assert_eq!(percentile(&s, 0.999), 999);
        assert_eq!(percentile(&s, 1.0), 1000);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn a_summary_line_holds_the_main_figures() {
        let report = Report {
            label: "this build, run 2".into(),
            seconds: 2.0,
            accepted: 3000,
            duplicates: 0,
            refused: 0,
            errors: 0,
            latencies_us: (1..=100).map(|ms| ms * 1000).collect(),
            peak_rss_kib: Some(1024),
            peak_threads: Some(12),
            wal: None,
            e2e_ms: Some(E2eReport {
                recorded: 3000,
                latencies_ms: (1..=100).collect(),
                per_second: 1400.0,
            }),
            writer_uses: [("record", 0.5), ("acknowledge", 0.25)]
                .map(|(what, share)| WriterUse {
                    what: what.into(),
                    share,
                    held: share * 2.0,
                    holds: 0,
                    hold_p99_ms: None,
                })
                .into(),
            daemon_ack_p99_ms: Some(5.0),
            daemon_ack_steps: Vec::new(),
            daemon_cpu: Some(CpuTime {
                user: 1.2,
                system: 0.6,
            }),
            bench_cpu: None,
        };
        assert_eq!(
            report.summary(),
            "this build, run 2: 1500/s accepted, ack p99 99.0 ms; 1400/s recorded, \
             delivery-to-recorded p99 99 ms; daemon CPU 600 µs a delivery; writer held 75% \
             (500 µs a delivery)"
        );
    }

    /// A forged flood's figures are per refusal (nothing is accepted).
    #[test]
    fn a_flood_is_measured_per_refusal() {
        let report = Report {
            label: "forged".into(),
            seconds: 2.0,
            accepted: 0,
            duplicates: 0,
            refused: 4000,
            errors: 0,
            latencies_us: vec![1000],
            peak_rss_kib: None,
            peak_threads: None,
            wal: None,
            e2e_ms: None,
            writer_uses: vec![WriterUse {
                what: "acknowledge".into(),
                share: 0.5,
                held: 1.0,
                holds: 50,
                hold_p99_ms: Some(7.5),
            }],
            daemon_ack_p99_ms: None,
            daemon_ack_steps: Vec::new(),
            daemon_cpu: Some(CpuTime {
                user: 0.6,
                system: 0.2,
            }),
            bench_cpu: None,
        };
        assert_eq!(
            report.summary(),
            "forged: 0/s accepted, ack p99 1.0 ms; daemon CPU 200 µs a delivery; \
             writer held 50% (250 µs a delivery)"
        );
        assert_eq!(
            report.writer_line().unwrap(),
            "daemon writer connection held: acknowledge 50% (250 µs a delivery; \
             80 deliveries a hold; p99 hold ≤ 7.5 ms)"
        );
    }
}
