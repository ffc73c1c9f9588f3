//! `cancelwatch bench`: a load generator for the webhook front door.
//!
//! It starts the daemon under test as a child process (this same binary,
//! `serve`, on a fresh temporary database), signs unique Stripe deliveries and
//! drives them either as fast as `--connections` allow or at a fixed `--rate`
//! (open loop: latency counts from the moment a request was due, so a stalled
//! server cannot hide its stalls). It prints accepted per second, latency
//! percentiles, refusals, errors and the daemon's peak resident memory as the
//! OS reports it. `--compare` runs the same load against group commit and
//! against one commit per request, and prints the ratio; `--against` runs it
//! against another build's daemon too, in turns (`--repeat`), driven by the
//! same load generator, and prints the runs side by side.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;

use crate::providers::stripe::signature;
use cancelwatch_sim::{SimConfig, Simulator};

const SECRET: &str = "whsec_bench_only";
const API_KEY: &str = "sk_test_bench_only";

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// How long each run offers load, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Requests per second to offer; 0 means as fast as the connections allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Concurrent connections (at a fixed rate: the most requests in flight).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Run twice, with group commit and with one commit per request, and print the ratio.
    #[arg(long, conflicts_with = "against")]
    pub compare: bool,
    /// Another build of cancelwatch: its daemon gets the same load, in turns
    /// with this build's (this one first), so two builds are compared in the
    /// same minutes and with the same load generator.
    #[arg(long, value_name = "BINARY")]
    pub against: Option<std::path::PathBuf>,
    /// How many runs of each daemon (and of each mode with `--compare`).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Commit each request on its own (the baseline) instead of group commit.
    #[arg(long)]
    pub no_group_commit: bool,
    /// SQLite synchronous level of the daemon under test: full or normal.
    #[arg(long, default_value = "full")]
    pub synchronous: String,
    /// Where the temporary database goes (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Hostile mode: sign with a secret the daemon does not know, so every
    /// delivery is refused (a flood of forged signatures).
    #[arg(long, conflicts_with = "e2e")]
    pub forged: bool,
    /// End to end: the daemon fetches from a simulator started here, and the
    /// report adds the time from sending a delivery to its recorded transition.
    #[arg(long)]
    pub e2e: bool,
    /// End to end: how many distinct resources (one delivery each) to prepare;
    /// default: rate × duration, or 40000 at full speed.
    #[arg(long)]
    pub e2e_events: Option<usize>,
    /// Extra settings for the daemon under test, as KEY=VALUE environment
    /// variables (e.g. CANCELWATCH_WORKERS__CONCURRENCY=2); repeatable.
    #[arg(long = "daemon-env", value_name = "KEY=VALUE")]
    pub daemon_env: Vec<String>,
}

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
    /// CPU time the daemon used from ready to the end of the run (and, end
    /// to end, until the last transition was recorded).
    pub daemon_cpu: Option<CpuTime>,
    /// CPU time this process (load generator and simulator) used meanwhile.
    pub bench_cpu: Option<CpuTime>,
}

/// A number from `/proc/<pid>/status`: `VmHWM:` (the most resident memory
/// the process ever had, KiB), `Threads:`. None once the process is gone.
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User and system CPU seconds of a process, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    /// Reads it for `pid` (`None` without `/proc`).
    fn of(pid: u32) -> Option<CpuTime> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_cpu_time(&stat)
    }

    fn since(self, start: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user - start.user,
            system: self.system - start.system,
        }
    }

    fn total(self) -> f64 {
        self.user + self.system
    }
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in
/// clock ticks of 1/100 s (the kernel's fixed USER_HZ). The command name
/// (field 2) may hold spaces and parentheses, so fields are counted from
/// after its closing parenthesis.
fn parse_cpu_time(stat: &str) -> Option<CpuTime> {
    const TICKS_PER_SECOND: f64 = 100.0;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some(CpuTime {
        user: user / TICKS_PER_SECOND,
        system: system / TICKS_PER_SECOND,
    })
}

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

    /// `seconds` of the run spread over the deliveries the daemon answered
    /// (accepted, duplicate or refused: a forged flood is measured per
    /// refusal), in µs: unlike a share of the run, comparable between runs
    /// of other lengths and rates.
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

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !["full", "normal"].contains(&args.synchronous.as_str()) {
        bail!("--synchronous must be full or normal");
    }
    if args.connections == 0 || args.duration == 0 || args.repeat == 0 {
        bail!("--connections, --duration and --repeat must be above 0");
    }
    let this = std::env::current_exe().context("finding the cancelwatch binary")?;
    if let Some(other) = &args.against {
        if !other.is_file() {
            bail!("--against {}: no such file", other.display());
        }
    }
    println!(
        "machine: {} cores; offered: {}; {} connections; {} s per run; synchronous={}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if args.rate == 0 {
            "full speed".to_string()
        } else {
            format!("{}/s", args.rate)
        },
        args.connections,
        args.duration,
        args.synchronous
    );
    // (daemon binary, group commit, label) of each run of one round.
    let mut round: Vec<(&Path, bool, String)> = Vec::new();
    if args.compare {
        round.push((&this, true, "group commit".into()));
        round.push((&this, false, "one commit per request".into()));
    } else {
        let mode = !args.no_group_commit;
        round.push((&this, mode, "this build".into()));
        if let Some(other) = &args.against {
            round.push((other, mode, format!("against {}", other.display())));
        }
    }
    let mut reports = Vec::new();
    for n in 1..=args.repeat {
        for (daemon, group_commit, label) in &round {
            let label = if args.repeat > 1 {
                format!("{label}, run {n}")
            } else {
                label.clone()
            };
            let report = run_once(&args, daemon, *group_commit, &label).await?;
            report.print();
            reports.push(report);
        }
    }
    if args.compare && args.repeat == 1 {
        if let [grouped, single] = &reports[..] {
            println!(
                "group commit / one commit per request: {:.1}x accepted per second",
                grouped.per_second() / single.per_second().max(f64::MIN_POSITIVE)
            );
        }
    }
    if reports.len() > 2 || args.against.is_some() {
        println!("== runs side by side");
        for report in &reports {
            println!("{}", report.summary());
        }
    }
    Ok(())
}

async fn run_once(
    args: &BenchArgs,
    daemon_bin: &Path,
    group_commit: bool,
    label: &str,
) -> anyhow::Result<Report> {
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating a temporary folder for the database")?;
    let port = free_port()?;
    let world = if args.e2e {
        Some(E2eWorld::prepare(args).await?)
    } else {
        None
    };
    let mut daemon = DaemonProcess::spawn(
        daemon_bin,
        tmp.path(),
        port,
        group_commit,
        args,
        world.as_ref().map(|w| w.sim.base_url()),
    )?;
    let url = format!("http://127.0.0.1:{port}");
    daemon.wait_ready(&url).await?;
    let cpu_at_start = (
        CpuTime::of(daemon.child.id()),
        CpuTime::of(std::process::id()),
    );
    // Each thread costs memory (a stack, an allocator heap): a count that
    // climbs under load explains a peak RSS that does.
    let pid = daemon.child.id();
    let most_threads = Arc::new(AtomicU64::new(0));
    let threads = tokio::spawn({
        let most = most_threads.clone();
        async move {
            while let Some(now) = proc_status(pid, "Threads:") {
                most.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let next_id = Arc::new(AtomicU64::new(0));
    let run_tag = format!("{}_{}", std::process::id(), port);
    for w in 0..args.connections {
        let mut conn = Connection::new(addr);
        let counters = counters.clone();
        let next_id = next_id.clone();
        let run_tag = run_tag.clone();
        let prepared = world.as_ref().map(|w| w.bodies.clone());
        let secret = if args.forged {
            "whsec_forged_by_bench"
        } else {
            SECRET
        };
        // At a fixed rate, each connection owns every `connections`-th slot.
        let interval = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.connections as f64 / args.rate as f64));
        let offset = interval.map(|i| i.mul_f64(w as f64 / args.connections as f64));
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut sent = Vec::new();
            let mut due = Instant::now() + offset.unwrap_or_default();
            loop {
                if interval.is_some() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let start = if interval.is_some() {
                    due
                } else {
                    Instant::now()
                };
                if start >= deadline {
                    break;
                }
                let n = next_id.fetch_add(1, Ordering::Relaxed);
                let sent_at = chrono::Utc::now().timestamp_millis();
                let (event_id, body) = match &prepared {
                    Some(bodies) => match bodies.get(n as usize) {
                        Some((id, body)) => (Some(id), body.clone()),
                        None => break,
                    },
                    None => (None, delivery(&run_tag, n)),
                };
                let header = signature::sign_header(secret, chrono::Utc::now().timestamp(), &body);
                let answer = conn.post_delivery(&header, body).await;
                let accepted = counters.record(answer);
                // End to end, only accepted deliveries are waited for.
                if let (true, Some(id)) = (accepted, event_id) {
                    sent.push((id.clone(), sent_at));
                }
                latencies.push(start.elapsed().as_micros() as u64);
                if let Some(iv) = interval {
                    due += iv;
                }
            }
            (latencies, sent)
        });
    }
    let mut latencies_us = Vec::new();
    let mut sent = Vec::new();
    while let Some(l) = workers.join_next().await {
        let (l, s) = l?;
        latencies_us.extend(l);
        sent.extend(s);
    }
    let seconds = started.elapsed().as_secs_f64();
    let e2e_ms = match &world {
        Some(_) => Some(e2e_report(&tmp.path().join("bench.db"), &sent).await?),
        None => None,
    };
    let metrics = daemon_metrics(&url).await;
    let writer_uses = writer_uses(&metrics, started.elapsed().as_secs_f64());
    let daemon_ack_p99_ms = ack_p99_bound_ms(&metrics);
    let daemon_ack_steps = ack_step_bounds_ms(&metrics);
    let daemon_cpu = CpuTime::of(daemon.child.id())
        .zip(cpu_at_start.0)
        .map(|(end, start)| end.since(start));
    let bench_cpu = CpuTime::of(std::process::id())
        .zip(cpu_at_start.1)
        .map(|(end, start)| end.since(start));
    let peak_rss_kib = proc_status(pid, "VmHWM:");
    threads.abort();
    let peak_threads = Some(most_threads.load(Ordering::Relaxed)).filter(|n| *n > 0);
    daemon.stop();
    Ok(Report {
        label: label.to_string(),
        seconds,
        accepted: counters.accepted.load(Ordering::Relaxed),
        duplicates: counters.duplicates.load(Ordering::Relaxed),
        refused: counters.refused.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        latencies_us,
        peak_rss_kib,
        peak_threads,
        e2e_ms,
        writer_uses,
        daemon_ack_p99_ms,
        daemon_ack_steps,
        daemon_cpu,
        bench_cpu,
    })
}

/// The daemon's `/metrics` text; empty when it cannot be read.
async fn daemon_metrics(url: &str) -> String {
    match reqwest::get(format!("{url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
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

/// From the daemon's metrics: per use, the share of `seconds` it held the
/// writer connection, and the p99 of one hold.
fn writer_uses(metrics: &str, seconds: f64) -> Vec<WriterUse> {
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
fn ack_p99_bound_ms(metrics: &str) -> Option<f64> {
    quantile_bound_ms(metrics, "cancelwatch_ack_seconds", None, 0.99)
}

/// Per step of an acknowledgement in the daemon, the upper bounds in ms of
/// the buckets that hold its median and its 99th percentile.
fn ack_step_bounds_ms(metrics: &str) -> Vec<(&'static str, Option<f64>, Option<f64>)> {
    let metric = "cancelwatch_ack_step_seconds";
    crate::inbox::ACK_STEPS
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

/// A simulator started in this process and, for each delivery to send, a
/// thin event about an outbound transfer already canceled there.
struct E2eWorld {
    sim: Simulator,
    /// (event id, body)
    bodies: Arc<Vec<(String, Vec<u8>)>>,
}

impl E2eWorld {
    async fn prepare(args: &BenchArgs) -> anyhow::Result<E2eWorld> {
        let count = args.e2e_events.unwrap_or(if args.rate > 0 {
            (args.rate * args.duration) as usize
        } else {
            40_000
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = Simulator::start(
            listener,
            SimConfig {
                stripe_api_key: API_KEY.into(),
                stripe_webhook_secret: SECRET.into(),
                ..SimConfig::default()
            },
        )
        .await?;
        let mut bodies = Vec::with_capacity(count);
        for _ in 0..count {
            let scenario = sim
                .scenario("outbound_transfer_canceled")
                .context("the simulator has the outbound_transfer_canceled scenario")?;
            for step in &scenario.steps {
                sim.apply_step(step);
            }
            let last = scenario
                .steps
                .last()
                .and_then(|s| s.deliveries.last())
                .context("the scenario ends with a delivery")?;
            let id = last
                .event_id()
                .context("a Stripe event has an id")?
                .to_string();
            bodies.push((id, serde_json::to_vec(&last.body)?));
        }
        Ok(E2eWorld {
            sim,
            bodies: Arc::new(bodies),
        })
    }
}

/// Waits (up to 60 s) until the daemon has processed every accepted delivery, then measures
/// send-to-record times from the daemon's own database.
async fn e2e_report(db: &Path, sent: &[(String, i64)]) -> anyhow::Result<E2eReport> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(db)
                .read_only(true),
        )
        .await
        .context("opening the daemon's database")?;
    // Asking what is left is a few index range scans (counting the
    // transitions would read every row, snapshots and all, ten times a
    // second, beside the daemon still at work); the rows are read once.
    for _ in 0..600 {
        if crate::store::sqlite::inbox::count_unfinished(&pool).await? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = crate::store::sqlite::resources::observed_by_trigger(&pool, "event").await?;
    pool.close().await;
    let sent_at: std::collections::HashMap<&str, i64> =
        sent.iter().map(|(id, t)| (id.as_str(), *t)).collect();
    let mut latencies_ms = Vec::new();
    let mut last = i64::MIN;
    for (trigger, observed) in &recorded {
        let (Some(&t0), Some(t1)) = (
            sent_at.get(trigger.as_str()),
            crate::time::parse_lenient(observed),
        ) else {
            continue;
        };
        let t1 = t1.timestamp_millis();
        last = last.max(t1);
        latencies_ms.push((t1 - t0).max(0) as u64);
    }
    let first = sent.iter().map(|(_, t)| *t).min().unwrap_or(0);
    let per_second = if latencies_ms.is_empty() {
        0.0
    } else {
        latencies_ms.len() as f64 / ((last - first) as f64 / 1000.0).max(0.001)
    };
    Ok(E2eReport {
        recorded: latencies_ms.len(),
        per_second,
        latencies_ms,
    })
}

/// A unique thin event about an outbound transfer that does not exist: the
/// front door does not care, and the daemon's provider API is a closed port.
/// Its ids are scattered like a provider's random ones (a bijection of `n`,
/// so still unique): sequential ids would put each group's keys on a few
/// neighbouring pages of the inbox's unique index, which real traffic
/// never does.
fn delivery(run_tag: &str, n: u64) -> Vec<u8> {
    let id = format!("{:016x}", scatter(n));
    format!(
        concat!(
            r#"{{"id":"evt_bench_{tag}_{id}","object":"v2.core.event","#,
            r#""type":"v2.money_management.outbound_transfer.canceled","created":"2026-10-30T12:00:00.000Z","#,
            r#""livemode":false,"related_object":{{"id":"obt_bench_{id}","type":"v2.money_management.outbound_transfer","#,
            r#""url":"/v2/money_management/outbound_transfers/obt_bench_{id}"}}}}"#
        ),
        tag = run_tag,
        id = id
    )
    .into_bytes()
}

/// SplitMix64's finalizer: a bijection of `u64` that scatters neighbours.
fn scatter(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

impl Counters {
    /// Counts an answer; true when it accepted a new delivery.
    fn record(&self, answer: anyhow::Result<(StatusCode, Bytes)>) -> bool {
        let (counter, accepted) = match answer {
            Ok((status, body)) if status.is_success() => {
                if body.windows(16).any(|w| w == b"\"duplicate\":true") {
                    (&self.duplicates, false)
                } else {
                    (&self.accepted, true)
                }
            }
            Ok((status, _)) if status.is_client_error() => (&self.refused, false),
            _ => (&self.errors, false),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        accepted
    }
}

/// One keep-alive HTTP/1.1 connection of the load generator to the daemon,
/// straight on hyper. reqwest's pool, URL parsing and per-request plumbing
/// cost the load generator about 65 µs of CPU a request, most of what the
/// daemon itself spent on one, on the same two cores; this costs a fraction.
/// A connection that fails is dropped and opened again on the next request.
struct Connection {
    addr: std::net::SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Connection {
    fn new(addr: std::net::SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// POSTs a signed delivery to `/webhooks/stripe`: the answer's status
    /// and body, within 30 s.
    async fn post_delivery(
        &mut self,
        signature: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let request = hyper::Request::post("/webhooks/stripe")
            .header(hyper::header::HOST, self.addr.to_string())
            .header("stripe-signature", signature)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let answer = tokio::time::timeout(Duration::from_secs(30), self.send(request)).await;
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                bail!("no answer within 30 s")
            }
        }
    }

    async fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let stream = tokio::net::TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                self.sender.insert(sender)
            }
        };
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The daemon under test, as a child process of this same binary.
struct DaemonProcess {
    child: Child,
}

impl DaemonProcess {
    fn spawn(
        exe: &Path,
        dir: &Path,
        port: u16,
        group_commit: bool,
        args: &BenchArgs,
        api_base: Option<String>,
    ) -> anyhow::Result<Self> {
        let api_base = api_base.unwrap_or_else(|| "http://127.0.0.1:9".into());
        std::fs::write(dir.join("none.toml"), "").context("writing an empty config")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .env_clear()
            .env("CANCELWATCH_CONFIG", dir.join("none.toml"))
            .env("CANCELWATCH_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "CANCELWATCH_DATABASE__URL",
                format!("sqlite://{}/bench.db", dir.display()),
            )
            .env(
                "CANCELWATCH_DATABASE__GROUP_COMMIT",
                group_commit.to_string(),
            )
            .env("CANCELWATCH_DATABASE__SYNCHRONOUS", &args.synchronous)
            .env(
                "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
                format!("[\"{SECRET}\"]"),
            )
            .env("CANCELWATCH_STRIPE__API_BASE", &api_base)
            .env("CANCELWATCH_STRIPE__API_KEY", API_KEY)
            .env("CANCELWATCH_JUICE__API_BASE", "http://127.0.0.1:9")
            .env("CANCELWATCH_RECONCILE__ENABLED", "false")
            .env("CANCELWATCH_LOG__LEVEL", "error");
        for kv in &args.daemon_env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--daemon-env {kv:?} is not KEY=VALUE"))?;
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the daemon under test")?;
        Ok(Self { child })
    }

    async fn wait_ready(&mut self, url: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon under test exited: {status}");
            }
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the daemon under test did not become ready within 30 s")
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A command name with a space and a parenthesis; utime 250 and
        // stime 75 ticks (fields 14 and 15).
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(
            parse_cpu_time(stat),
            Some(CpuTime {
                user: 2.5,
                system: 0.75
            })
        );
        assert_eq!(parse_cpu_time("4242 (cut short) S 1 2"), None);
        let own = CpuTime::of(std::process::id()).expect("this test runs on Linux");
        assert!(own.user >= 0.0 && own.system >= 0.0);
    }

    #[test]
    fn deliveries_are_unique_signed_thin_events() {
        let a = delivery("t", 1);
        let b = delivery("t", 2);
        assert_ne!(a, b);
        let e = crate::providers::stripe::event::ThinEvent::decode(&a).unwrap();
        let id = format!("{:016x}", scatter(1));
        assert_eq!(e.id, format!("evt_bench_t_{id}"));
        assert_eq!(e.resource().unwrap().id, format!("obt_bench_{id}"));
        // Neighbours land far apart, and none of many collide.
        assert!(scatter(1).abs_diff(scatter(2)) > 1 << 32);
        let ids: std::collections::HashSet<u64> = (0..100_000).map(scatter).collect();
        assert_eq!(ids.len(), 100_000);
    }
}
