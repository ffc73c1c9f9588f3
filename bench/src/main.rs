//! `cancelwatch-bench`: a load generator for cancelwatch's webhook front door.
//!
//! It starts the daemon under test as a child process (a `cancelwatch`
//! binary, `serve`, on a fresh temporary database), signs unique Stripe
//! deliveries and drives them either as fast as `--connections` allow or at a
//! fixed `--rate` (open loop: latency counts from the moment a request was
//! due, so a stalled server cannot hide its stalls). It prints accepted per
//! second, latency percentiles, refusals, errors and the daemon's peak
//! resident memory as the OS reports it. `--compare` runs the same load
//! against group commit and against one commit per request, and prints the
//! ratio; `--against` runs it against another build's daemon too, in turns
//! (`--repeat`), driven by the same load generator, and prints the runs side
//! by side.
//!
//! It sees the daemon only as a client does: its webhook endpoint, `/readyz`,
//! `/metrics`, `/proc`, and (end to end) its database file, read-only.
//!
//! `--database-url postgres://…` (a PostgreSQL server) runs the same load
//! against SQLite and then against PostgreSQL, a fresh database of the
//! run's own on that server, served by `--replicas N` daemons with the
//! connections spread over them.
//!
//! ```sh
//! cargo build --release && cargo run --release -p cancelwatch-bench -- --duration 10 --rate 2000
//! ```

mod daemon;
mod e2e;
mod load;
mod metrics;
mod pg;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use daemon::{free_port, proc_status, CpuTime, DaemonProcess};
use e2e::{e2e_report, DatabaseAt, E2eWorld};
use load::{delivery, Connection, Counters};
use metrics::{ack_p99_bound_ms, ack_step_bounds_ms, counter, daemon_metrics, writer_uses};
use report::{Report, WalFigures};

/// The webhook secret and API key the daemon under test is configured with.
const SECRET: &str = "whsec_bench_only";
const API_KEY: &str = "sk_test_bench_only";

/// Load-tests the webhook front door of a cancelwatch daemon it starts.
#[derive(Parser, Clone, Debug)]
#[command(name = "cancelwatch-bench", version)]
pub struct BenchArgs {
    /// The cancelwatch binary to load (default: `cancelwatch` in the folder
    /// of this binary, i.e. the daemon of the same cargo build profile).
    #[arg(long, value_name = "BINARY")]
    pub daemon: Option<PathBuf>,
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
    /// with the one under test (that one first), so two builds are compared
    /// in the same minutes and with the same load generator.
    #[arg(long, value_name = "BINARY")]
    pub against: Option<PathBuf>,
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
    pub dir: Option<PathBuf>,
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
    /// A PostgreSQL server (`postgres://user@host:port/db`): each round
    /// runs on SQLite and then on PostgreSQL, in a database created on this
    /// server for the run and dropped after it.
    #[arg(long, value_name = "URL", conflicts_with_all = ["compare", "against"])]
    pub database_url: Option<String>,
    /// How many daemons serve the PostgreSQL database at once, the
    /// connections spread over them (with `--database-url`).
    #[arg(long, default_value_t = 1, requires = "database_url")]
    pub replicas: usize,
    /// Extra settings for the daemon under test, as KEY=VALUE environment
    /// variables (e.g. CANCELWATCH_WORKERS__CONCURRENCY=2); repeatable.
    #[arg(long = "daemon-env", value_name = "KEY=VALUE")]
    pub daemon_env: Vec<String>,
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cancelwatch-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cancelwatch-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon binary to load: `--daemon`, or `cancelwatch` beside this
/// binary. This binary links the daemon's library, so cargo rebuilds it
/// whenever the daemon changes; a `cancelwatch` older than it may predate
/// such a change: say so rather than measure an old daemon quietly.
fn daemon_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.daemon {
        if !path.is_file() {
            bail!("--daemon {}: no such file", path.display());
        }
        return Ok(path.clone());
    }
    let this = std::env::current_exe().context("finding this binary")?;
    let daemon = this.with_file_name(format!("cancelwatch{}", std::env::consts::EXE_SUFFIX));
    if !daemon.is_file() {
        bail!(
            "no daemon at {}: build it with the same profile first (`cargo build --release`), or pass --daemon",
            daemon.display()
        );
    }
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(daemon_at), Some(this_at)) = (modified(&daemon), modified(&this)) {
        if daemon_at < this_at {
            eprintln!(
                "cancelwatch-bench: note: {} is older than this binary; run `cargo build --release` first if the daemon changed",
                daemon.display()
            );
        }
    }
    Ok(daemon)
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !["full", "normal"].contains(&args.synchronous.as_str()) {
        bail!("--synchronous must be full or normal");
    }
    if args.connections == 0 || args.duration == 0 || args.repeat == 0 || args.replicas == 0 {
        bail!("--connections, --duration, --repeat and --replicas must be above 0");
    }
    if let Some(url) = &args.database_url {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("--database-url must be a postgres:// URL");
        }
    }
    let this = daemon_binary(&args)?;
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
    // (daemon binary, group commit, engine, label) of each run of one round.
    let mut round: Vec<(&Path, bool, Engine, String)> = Vec::new();
    if args.compare {
        round.push((&this, true, Engine::Sqlite, "group commit".into()));
        round.push((
            &this,
            false,
            Engine::Sqlite,
            "one commit per request".into(),
        ));
    } else if let Some(server) = &args.database_url {
        let mode = !args.no_group_commit;
        round.push((&this, mode, Engine::Sqlite, "SQLite".into()));
        let replicas = args.replicas;
        let label = format!(
            "PostgreSQL, {replicas} replica{}",
            if replicas == 1 { "" } else { "s" }
        );
        let pg = Engine::Postgres {
            server: server.clone(),
            replicas,
        };
        round.push((&this, mode, pg, label));
    } else {
        let mode = !args.no_group_commit;
        round.push((&this, mode, Engine::Sqlite, "this build".into()));
        if let Some(other) = &args.against {
            let label = format!("against {}", other.display());
            round.push((other, mode, Engine::Sqlite, label));
        }
    }
    let mut reports = Vec::new();
    for n in 1..=args.repeat {
        for (daemon, group_commit, engine, label) in &round {
            let label = if args.repeat > 1 {
                format!("{label}, run {n}")
            } else {
                label.clone()
            };
            let report = run_once(&args, daemon, *group_commit, engine, &label).await?;
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
    if reports.len() > 2 || args.against.is_some() || args.database_url.is_some() {
        println!("== runs side by side");
        for report in &reports {
            println!("{}", report.summary());
        }
    }
    Ok(())
}

/// The storage engine of a run.
#[derive(Debug, Clone)]
enum Engine {
    /// A new SQLite file in the run's temporary folder, one daemon.
    Sqlite,
    /// A new database on this PostgreSQL server, `replicas` daemons.
    Postgres { server: String, replicas: usize },
}

async fn run_once(
    args: &BenchArgs,
    daemon_bin: &Path,
    group_commit: bool,
    engine: &Engine,
    label: &str,
) -> anyhow::Result<Report> {
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating a temporary folder for the database")?;
    let (database, run_db, replicas) = match engine {
        Engine::Sqlite => (DatabaseAt::Sqlite(tmp.path().join("bench.db")), None, 1),
        Engine::Postgres { server, replicas } => {
            let db = pg::RunDatabase::create(server).await?;
            (DatabaseAt::Postgres(db.url.clone()), Some(db), *replicas)
        }
    };
    let database_url = match &database {
        DatabaseAt::Sqlite(path) => format!("sqlite://{}", path.display()),
        DatabaseAt::Postgres(url) => url.clone(),
    };
    let world = if args.e2e {
        Some(E2eWorld::prepare(args).await?)
    } else {
        None
    };
    let mut ports = Vec::with_capacity(replicas);
    let mut daemons = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let port = free_port()?;
        daemons.push(DaemonProcess::spawn(
            daemon_bin,
            tmp.path(),
            &database_url,
            port,
            group_commit,
            args,
            world.as_ref().map(|w| w.sim.base_url()),
        )?);
        ports.push(port);
    }
    for (daemon, port) in daemons.iter_mut().zip(&ports) {
        daemon
            .wait_ready(&format!("http://127.0.0.1:{port}"))
            .await?;
    }
    // The first replica's metrics stand for all (each sees its share of
    // the load); CPU time is the sum over the replicas.
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let cpu_of_daemons = |daemons: &[DaemonProcess]| {
        daemons
            .iter()
            .map(|d| CpuTime::of(d.child.id()))
            .try_fold(CpuTime::default(), |sum, t| Some(sum.plus(t?)))
    };
    let cpu_at_start = (cpu_of_daemons(&daemons), CpuTime::of(std::process::id()));
    // Each thread costs memory (a stack, an allocator heap): a count that
    // climbs under load explains a peak RSS that does.
    let pid = daemons[0].child.id();
    let most_threads = Arc::new(AtomicU64::new(0));
    // The WAL's size over the run: a WAL that keeps growing makes every sync
    // of it a change of the file's size too, which the file system must
    // journal (see docs/performance.md).
    let wal_path = match &database {
        DatabaseAt::Sqlite(path) => Some(PathBuf::from(format!("{}-wal", path.display()))),
        DatabaseAt::Postgres(_) => None,
    };
    let wal_most = Arc::new(AtomicU64::new(0));
    let threads = tokio::spawn({
        let most = most_threads.clone();
        let (wal_path, wal_most) = (wal_path.clone(), wal_most.clone());
        async move {
            while let Some(now) = proc_status(pid, "Threads:") {
                most.fetch_max(now, Ordering::Relaxed);
                if let Some(len) = wal_path.as_ref().and_then(|p| std::fs::metadata(p).ok()) {
                    wal_most.fetch_max(len.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    let addrs: Vec<std::net::SocketAddr> =
        ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let next_id = Arc::new(AtomicU64::new(0));
    let run_tag = format!("{}_{}", std::process::id(), ports[0]);
    for w in 0..args.connections {
        // The connections spread over the replicas, as a load balancer would.
        let mut conn = Connection::new(addrs[w % addrs.len()]);
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
                let header = cancelwatch_sim::signing::stripe_signature(
                    secret,
                    chrono::Utc::now().timestamp(),
                    &body,
                );
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
        Some(_) => Some(e2e_report(&database, &sent).await?),
        None => None,
    };
    let metrics = daemon_metrics(&url).await;
    let writer_uses = writer_uses(&metrics, started.elapsed().as_secs_f64());
    let daemon_ack_p99_ms = ack_p99_bound_ms(&metrics);
    let daemon_ack_steps = ack_step_bounds_ms(&metrics);
    let wal = wal_path.as_ref().and_then(|path| {
        Some(WalFigures {
            syncs: counter(&metrics, "cancelwatch_wal_syncs_total")? as u64,
            shared: counter(&metrics, "cancelwatch_wal_syncs_shared_total").unwrap_or(0.0) as u64,
            most_bytes: wal_most.load(Ordering::Relaxed),
            end_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        })
    });
    let daemon_cpu = cpu_of_daemons(&daemons)
        .zip(cpu_at_start.0)
        .map(|(end, start)| end.since(start));
    let bench_cpu = CpuTime::of(std::process::id())
        .zip(cpu_at_start.1)
        .map(|(end, start)| end.since(start));
    let peak_rss_kib = daemons
        .iter()
        .filter_map(|d| proc_status(d.child.id(), "VmHWM:"))
        .max();
    threads.abort();
    let peak_threads = Some(most_threads.load(Ordering::Relaxed)).filter(|n| *n > 0);
    for d in &mut daemons {
        d.stop();
    }
    if let Some(db) = run_db {
        db.drop().await;
    }
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
        wal,
        daemon_cpu,
        bench_cpu,
    })
}
