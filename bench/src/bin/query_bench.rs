//! Query benchmark: with a million transitions, one resource's history and a
//! filtered page of transitions must come back fast.
//!
//! ```text
//! cargo run --release -p cancelwatch-bench --bin query_bench -- --transitions 1000000
//! cargo run --release -p cancelwatch-bench --bin query_bench -- --transitions 1000000 --console 1000
//! ```
//!
//! With `--console N`, a bulk transfer of N items (three transitions and a
//! refund each) is added to the seed, the daemon is started on the
//! database, and its console's page of that transfer is timed over HTTP,
//! signed in: the whole page, timeline included, as a browser gets it.
//!
//! Seeds a temporary database (one transaction, prepared inserts, ~10
//! transitions per resource over ~100k resources of every kind, 90 days of
//! observations), prints the query plans, then times the same
//! `store::queries` functions the CLI and the API call: median and p99 over
//! many repetitions.

use std::time::{Duration, Instant};

use anyhow::Context;
use cancelwatch::store::model::{PageRequest, TransitionFilter};
use cancelwatch::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Args {
    transitions: usize,
    resources: usize,
    reps: usize,
    /// Items of the bulk transfer whose console page is timed (0: none).
    console: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        transitions: 1_000_000,
        resources: 0,
        reps: 300,
        console: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: usize = value.parse().with_context(|| format!("{flag} {value}"))?;
        match flag.as_str() {
            "--transitions" => a.transitions = n,
            "--resources" => a.resources = n,
            "--reps" => a.reps = n,
            "--console" => a.console = n,
            _ => {
                anyhow::bail!("unknown flag {flag} (--transitions, --resources, --reps, --console)")
            }
        }
    }
    if a.resources == 0 {
        a.resources = (a.transitions / 10).max(10);
    }
    Ok(a)
}

/// Statuses a kind moves through (the seed picks among them).
fn statuses(kind: &str) -> &'static [&'static str] {
    match kind {
        "stripe.outbound_transfer" => &["processing", "posted", "canceled", "failed", "returned"],
        "stripe.batch_job" => &[
            "ready_for_upload",
            "validating",
            "in_progress",
            "canceling",
            "complete",
            "canceled",
        ],
        "juice.bulk_transfer" => &["created", "executing", "completed", "cancelled", "expired"],
        _ => &[
            "pending",
            "processing",
            "completed",
            "cancelled",
            "reversed",
        ],
    }
}

struct SeedResource {
    provider: &'static str,
    kind: &'static str,
    id: String,
    parent_id: Option<String>,
    status: Option<usize>,
}

async fn seed(db: &sqlx::SqlitePool, a: &Args) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    // Resources: 40% outbound transfers, 10% batch jobs, 5% bulk transfers
    // whose 9 items each make up the other 45%.
    let mut resources: Vec<SeedResource> = Vec::with_capacity(a.resources);
    let mut bulk = 0usize;
    while resources.len() < a.resources {
        let i = resources.len();
        match i % 20 {
            0..=7 => resources.push(SeedResource {
                provider: "stripe",
                kind: "stripe.outbound_transfer",
                id: format!("obt_{i:010}"),
                parent_id: None,
                status: None,
            }),
            8..=9 => resources.push(SeedResource {
                provider: "stripe",
                kind: "stripe.batch_job",
                id: format!("batchv2_{i:010}"),
                parent_id: None,
                status: None,
            }),
            _ => {
                bulk += 1;
                let parent = format!("00000000-0000-4000-8000-{bulk:012}");
                resources.push(SeedResource {
                    provider: "juice",
                    kind: "juice.bulk_transfer",
                    id: parent.clone(),
                    parent_id: None,
                    status: None,
                });
                for item in 0..9 {
                    resources.push(SeedResource {
                        provider: "juice",
                        kind: "juice.transfer",
                        id: format!("trf_{bulk:08}_{item}"),
                        parent_id: Some(parent.clone()),
                        status: None,
                    });
                }
            }
        }
    }
    resources.truncate(a.resources);

    // Transitions in time order over 90 days: each goes to a random resource
    // and moves it to another of its kind's statuses.
    let start = chrono::Utc::now() - chrono::Duration::days(90);
    let step_ms = (90 * 86_400_000) / a.transitions.max(1) as i64;
    let mut plan: Vec<(u32, Option<u8>, u8, i64)> = Vec::with_capacity(a.transitions);
    for n in 0..a.transitions {
        let r = rng.gen_range(0..resources.len());
        let res = &mut resources[r];
        let list = statuses(res.kind);
        let to = match res.status {
            None => 0,
            Some(prev) => (prev + rng.gen_range(1..list.len())) % list.len(),
        };
        let at = n as i64 * step_ms + rng.gen_range(0..step_ms.max(1));
        plan.push((r as u32, res.status.map(|s| s as u8), to as u8, at));
        res.status = Some(to);
    }

    let mut tx = db.begin().await?;
    let first_seen = cancelwatch::time::fmt(start);
    for (r, res) in resources.iter().enumerate() {
        let status = res.status.map(|s| statuses(res.kind)[s]);
        sqlx::query(
            "INSERT INTO resources (rid, provider, kind, id, parent_id, status, terminal, livemode,
                                    amount, currency, snapshot, first_seen_at, last_observed_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
        )
        .bind(r as i64 + 1)
        .bind(res.provider)
        .bind(res.kind)
        .bind(&res.id)
        .bind(&res.parent_id)
        .bind(status)
        .bind(matches!(
            status,
            Some("canceled" | "cancelled" | "complete" | "completed")
        ))
        .bind(rng.gen_range(100..1_000_000i64))
        .bind("usd")
        .bind(format!(
            r#"{{"id":"{}","status":"{}"}}"#,
            res.id,
            status.unwrap_or("")
        ))
        .bind(&first_seen)
        .bind(&first_seen)
        .execute(&mut *tx)
        .await?;
    }
    for (n, (r, from, to, at)) in plan.iter().enumerate() {
        let res = &resources[*r as usize];
        let list = statuses(res.kind);
        let observed_at = cancelwatch::time::fmt(start + chrono::Duration::milliseconds(*at));
        let to_status = list[*to as usize];
        let snapshot = format!(
            r#"{{"id":"{}","object":"{}","status":"{}","amount":{{"value":1234,"currency":"usd"}},"metadata":{{"order":"ord_{n}"}}}}"#,
            res.id, res.kind, to_status
        );
        sqlx::query(
            "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                      to_status, observed_at, provider_at, trigger_type, trigger_id,
                                      livemode, snapshot)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'event', ?, 0, ?)",
        )
        .bind(*r as i64 + 1)
        .bind(res.provider)
        .bind(res.kind)
        .bind(&res.id)
        .bind(&res.parent_id)
        .bind(from.map(|f| list[f as usize]))
        .bind(to_status)
        .bind(&observed_at)
        .bind(&observed_at)
        .bind(format!("evt_{n:012}"))
        .bind(snapshot)
        .execute(&mut *tx)
        .await?;
    }
    // A refund for every cancelled transfer.
    for (r, res) in resources.iter().enumerate() {
        let status = res.status.map(|s| statuses(res.kind)[s]);
        if matches!(
            (res.kind, status),
            ("stripe.outbound_transfer", Some("canceled")) | ("juice.transfer", Some("cancelled"))
        ) {
            sqlx::query(
                "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason,
                                      amount, currency, opened_at, updated_at, trigger_type)
                 VALUES (?, ?, ?, ?, ?, 'pending', 'cancelled', 1234, 'usd', ?, ?, 'event')",
            )
            .bind(r as i64 + 1)
            .bind(res.provider)
            .bind(res.kind)
            .bind(&res.id)
            .bind(&res.parent_id)
            .bind(&first_seen)
            .bind(&first_seen)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    sqlx::query("ANALYZE").execute(db).await?;
    Ok(())
}

/// Median and 99th percentile of the samples.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:>8.3} ms   p99 {:>8.3} ms   ({} runs)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.len()
    )
}

async fn time<F, Fut, T>(reps: usize, mut f: F) -> anyhow::Result<String>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut samples = Vec::with_capacity(reps);
    for i in 0..reps {
        let t = Instant::now();
        f(i).await?;
        samples.push(t.elapsed());
    }
    Ok(summary(samples))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let dir = tempfile::tempdir()?;
    let mut config = cancelwatch::Config::default();
    config.database.url = format!("sqlite://{}/bench.db", dir.path().display());
    config.database.synchronous = "normal".into();
    // The daemon's store creates and migrates the file; the seed writes
    // straight to it, as fast as SQLite takes rows.
    let store: Store = cancelwatch::open_store(&config).await?;
    let seeder =
        sqlx::SqlitePool::connect(&format!("sqlite://{}/bench.db", dir.path().display())).await?;

    let t = Instant::now();
    seed(&seeder, &a).await?;
    println!(
        "seeded {} transitions over {} resources in {:.1} s",
        a.transitions,
        a.resources,
        t.elapsed().as_secs_f64()
    );
    let pool = &store;

    let since = cancelwatch::time::fmt(chrono::Utc::now() - chrono::Duration::days(30));
    let filtered = TransitionFilter {
        kind: Some("stripe.outbound_transfer".into()),
        to_status: Some("canceled".into()),
        since: Some(since.clone()),
        ..TransitionFilter::default()
    };
    let by_kind = TransitionFilter {
        kind: Some("juice.transfer".into()),
        ..TransitionFilter::default()
    };
    let old = TransitionFilter {
        until: Some(cancelwatch::time::fmt(
            chrono::Utc::now() - chrono::Duration::days(60),
        )),
        ..TransitionFilter::default()
    };
    let old_of_kind = TransitionFilter {
        kind: Some("juice.transfer".into()),
        ..old.clone()
    };
    let week_of_provider = TransitionFilter {
        provider: Some("stripe".into()),
        since: Some(cancelwatch::time::fmt(
            chrono::Utc::now() - chrono::Duration::days(7),
        )),
        ..TransitionFilter::default()
    };
    let first = PageRequest::default();

    // A cursor deep in the by-kind listing (past half of it), reached by walking it.
    let mut deep = PageRequest {
        limit: Some(1000),
        cursor: None,
    };
    let mut walked = 0;
    while walked < a.transitions / 4 {
        let p = pool.transitions(&by_kind, &deep).await?;
        walked += p.data.len();
        match p.next_cursor {
            Some(c) => deep.cursor = Some(c),
            None => break,
        }
    }
    let deep = PageRequest {
        limit: Some(100),
        cursor: deep.cursor,
    };

    println!("\nquery plans:");
    for (name, f, p) in [
        ("filtered page", &filtered, &first),
        ("by kind, deep cursor", &by_kind, &deep),
        ("until -60d", &old, &first),
        ("kind, until -60d", &old_of_kind, &first),
        ("provider, since -7d", &week_of_provider, &first),
    ] {
        for line in pool.explain_transitions(f, p).await? {
            println!("  {name:<22} {line}");
        }
    }

    let outbound_ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM resources WHERE kind = 'stripe.outbound_transfer' ORDER BY rid LIMIT 1000",
    )
    .fetch_all(&seeder)
    .await?;
    let bulk_ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM resources WHERE kind = 'juice.bulk_transfer' ORDER BY rid LIMIT 1000",
    )
    .fetch_all(&seeder)
    .await?;
    anyhow::ensure!(
        !outbound_ids.is_empty() && !bulk_ids.is_empty(),
        "seed too small"
    );

    let probe = pool.history(&bulk_ids[0]).await?.context("seeded")?;
    let r = &probe.resources[0];
    println!(
        "\nsample bulk transfer: {} transitions, {} items with {} transitions",
        r.transitions.len(),
        r.children.len(),
        r.children
            .iter()
            .map(|c| c.transitions.len())
            .sum::<usize>()
    );
    let page = pool.transitions(&filtered, &first).await?;
    println!("filtered page: {} rows", page.data.len());

    println!("\ntimings:");
    let reps = a.reps;
    let line = time(reps, |i| {
        let id = outbound_ids[i % outbound_ids.len()].clone();
        async move {
            pool.history(&id).await?.context("seeded")?;
            Ok(())
        }
    })
    .await?;
    println!("  history, outbound transfer            {line}");
    let line = time(reps, |i| {
        let id = bulk_ids[i % bulk_ids.len()].clone();
        async move {
            pool.history(&id).await?.context("seeded")?;
            Ok(())
        }
    })
    .await?;
    println!("  history, bulk transfer + 9 items      {line}");
    let line = time(reps, |_| async {
        Ok(pool.transitions(&filtered, &first).await?)
    })
    .await?;
    println!("  transitions --kind stripe.outbound_transfer --to canceled --since -30d (100 rows)\n                                         {line}");
    let line = time(reps, |_| async {
        Ok(pool
            .transitions(&TransitionFilter::default(), &first)
            .await?)
    })
    .await?;
    println!("  transitions, unfiltered first page    {line}");
    let line = time(reps, |_| async {
        Ok(pool.transitions(&by_kind, &deep).await?)
    })
    .await?;
    println!("  transitions --kind juice.transfer, page ~{walked} rows deep\n                                         {line}");
    let line = time(reps, |i| {
        let first = &first;
        let filter = TransitionFilter {
            kind: Some("stripe.outbound_transfer".into()),
            resource_id: Some(outbound_ids[i % outbound_ids.len()].clone()),
            ..TransitionFilter::default()
        };
        async move { Ok(pool.transitions(&filter, first).await?) }
    })
    .await?;
    println!("  transitions --kind stripe.outbound_transfer --resource <id>\n                                         {line}");
    let line = time(reps.min(50), |_| async {
        Ok(pool.transitions(&old, &first).await?)
    })
    .await?;
    println!("  transitions --until -60d (worst case: newer rows skipped)\n                                         {line}");
    let line = time(reps.min(50), |_| async {
        Ok(pool.transitions(&old_of_kind, &first).await?)
    })
    .await?;
    println!("  transitions --kind juice.transfer --until -60d\n                                         {line}");
    let line = time(reps, |_| async {
        Ok(pool.transitions(&week_of_provider, &first).await?)
    })
    .await?;
    println!("  transitions --provider stripe --since -7d\n                                         {line}");

    store.close().await;
    if a.console > 0 {
        console_page(&seeder, &config, &a).await?;
    }
    seeder.close().await;
    Ok(())
}

/// Seeds a bulk transfer of `a.console` items, starts the daemon on the
/// database and times its console page over HTTP.
async fn console_page(
    seeder: &sqlx::SqlitePool,
    config: &cancelwatch::Config,
    a: &Args,
) -> anyhow::Result<()> {
    let bulk = "console-bench-bulk";
    let at = |s: i64| cancelwatch::time::fmt(chrono::Utc::now() - chrono::Duration::seconds(s));
    let mut tx = seeder.begin().await?;
    let mut rid: i64 = sqlx::query_scalar("SELECT MAX(rid) FROM resources")
        .fetch_one(&mut *tx)
        .await?;
    rid += 1;
    let bulk_rid = rid;
    sqlx::query(
        "INSERT INTO resources (rid, provider, kind, id, status, terminal, livemode, amount,
                                currency, snapshot, status_since, first_seen_at, last_observed_at)
         VALUES (?, 'juice', 'juice.bulk_transfer', ?, 'cancelled', 1, 0, ?, 'eur', ?, ?, ?, ?)",
    )
    .bind(bulk_rid)
    .bind(bulk)
    .bind(a.console as i64 * 1_250)
    .bind(format!(
        r#"{{"id":"{bulk}","status":"cancelled","items":{}}}"#,
        a.console
    ))
    .bind(at(600))
    .bind(at(3_600))
    .bind(at(600))
    .execute(&mut *tx)
    .await?;
    for (n, (from, to)) in [
        (None, "created"),
        (Some("created"), "executing"),
        (Some("executing"), "cancelled"),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO transitions (rid, provider, kind, resource_id, from_status, to_status,
                                      observed_at, trigger_type, trigger_id, livemode)
             VALUES (?, 'juice', 'juice.bulk_transfer', ?, ?, ?, ?, 'event', ?, 0)",
        )
        .bind(bulk_rid)
        .bind(bulk)
        .bind(from)
        .bind(to)
        .bind(at(3_600 - n as i64 * 1_000))
        .bind(format!("evt_bulk_{n}"))
        .execute(&mut *tx)
        .await?;
    }
    for item in 0..a.console {
        rid += 1;
        let id = format!("{bulk}:ref_{item:05}");
        sqlx::query(
            "INSERT INTO resources (rid, provider, kind, id, parent_id, status, terminal, livemode,
                                    amount, currency, status_since, first_seen_at, last_observed_at)
             VALUES (?, 'juice', 'juice.transfer', ?, ?, 'cancelled', 1, 0, 1250, 'eur', ?, ?, ?)",
        )
        .bind(rid)
        .bind(&id)
        .bind(bulk)
        .bind(at(900))
        .bind(at(3_600))
        .bind(at(900))
        .execute(&mut *tx)
        .await?;
        for (n, (from, to)) in [
            (None, "pending"),
            (Some("pending"), "processing"),
            (Some("processing"), "cancelled"),
        ]
        .into_iter()
        .enumerate()
        {
            sqlx::query(
                "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                          to_status, observed_at, trigger_type, trigger_id, livemode)
                 VALUES (?, 'juice', 'juice.transfer', ?, ?, ?, ?, ?, 'event', ?, 0)",
            )
            .bind(rid)
            .bind(&id)
            .bind(bulk)
            .bind(from)
            .bind(to)
            .bind(at(3_500 - n as i64 * 1_000 - item as i64 % 300))
            .bind(format!("evt_item_{item}_{n}"))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason,
                                  amount, currency, opened_at, completed_at, updated_at, trigger_type)
             VALUES (?, 'juice', 'juice.transfer', ?, ?, 'completed', 'cancelled', 1250, 'eur',
                     ?, ?, ?, 'event')",
        )
        .bind(rid)
        .bind(&id)
        .bind(bulk)
        .bind(at(900))
        .bind(at(300))
        .bind(at(300))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;

    let mut config = config.clone();
    config.server.admin_token = "bench-console-token".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(cancelwatch::run_with_admin(config, listener, None, async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut cookie = None;
    for _ in 0..200 {
        if let Ok(r) = http
            .post(format!("{base}/ui/sign-in"))
            .form(&[("token", "bench-console-token")])
            .send()
            .await
        {
            cookie = r
                .headers()
                .get(reqwest::header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::to_string);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cookie = cookie.context("signing in to the console")?;
    let url = format!("{base}/ui/resources/{bulk}");
    let page = http
        .get(&url)
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let lanes = page.matches("<g class=\"lane\"").count();
    anyhow::ensure!(lanes == a.console + 1, "{lanes} lanes drawn");
    println!(
        "\nconsole: a bulk transfer of {} items, {} lanes, a page of {} KiB",
        a.console,
        lanes,
        page.len() / 1024
    );
    let line = time(a.reps.min(50), |_| {
        let (http, url, cookie) = (&http, &url, &cookie);
        async move {
            http.get(url)
                .header(reqwest::header::COOKIE, cookie)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            Ok(())
        }
    })
    .await?;
    println!("  GET /ui/resources/<bulk of {} items>  {line}", a.console);
    let _ = stop.send(());
    daemon.await??;
    Ok(())
}
