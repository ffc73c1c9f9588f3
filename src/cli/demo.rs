//! `cancelwatch demo`: the first thing a newcomer runs. Starts the daemon on
//! the embedded defaults together with the provider simulator (throwaway
//! secrets, printed), plays every scenario step by step, prints the resulting
//! histories, refunds and alerts, then keeps serving until Ctrl-C so the other
//! commands can be tried against it.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::read::{self, AlertsArgs, HistoryArgs, PageArgs};
use crate::pipeline;
use crate::store::model::DEFAULT_LIMIT;
use crate::store::Store;
use crate::Config;
use cancelwatch_sim::{DeliveryOptions, SimConfig, Simulator, Step};

/// How long one step may take to be recorded before the demo gives up on it.
const STEP_DEADLINE: Duration = Duration::from_secs(20);

pub async fn run(mut config: Config) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the terminal for the story; warnings still show.
        config.log.level = "warn".into();
    }
    crate::init_logging(&config.log);
    use_throwaway_secrets(&mut config);

    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the simulator on 127.0.0.1")?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    config.stripe.api_base = sim_url.clone();
    config.juice.api_base = sim_url.clone();
    config.validate()?;

    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("server.listen: cannot listen on {addr} (is cancelwatch already running? set CANCELWATCH_SERVER__LISTEN)")
    })?;
    let url = format!("http://{}", listener.local_addr()?);
    // The console's address is printed before the daemon starts, so an admin
    // address of its own is bound here too.
    let admin = match config.admin_listen_addr()? {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("server.admin_listen: cannot listen on {addr} (set CANCELWATCH_SERVER__ADMIN_LISTEN)")
        })?),
        None => None,
    };
    let admin_url = match &admin {
        Some(l) => format!("http://{}", l.local_addr()?),
        None => url.clone(),
    };
    let sim = Simulator::start(
        sim_listener,
        SimConfig {
            stripe_api_key: config.stripe.api_key.clone(),
            juice_api_key: config.juice.api_key.clone(),
            stripe_webhook_secret: config.stripe.webhook_secrets[0].clone(),
            juice_checksum_key: config.juice.checksum_keys[0].clone(),
            target: Some(url.clone()),
        },
    )
    .await?;
    print_banner(&config, &url, &admin_url, &sim_url)?;

    // Opened (and migrated) before the daemon starts, so the two never race
    // to create the schema.
    let ctx = pipeline::Context::open(config.clone()).await?;
    let daemon = tokio::spawn(crate::run_with_admin(
        config.clone(),
        listener,
        admin,
        crate::shutdown_signal(),
    ));
    let store = ctx.store.clone();

    let shown = play_scenarios(&ctx, &sim, &store).await?;
    // Let the last follow-ups (reversals, late cancels) land before printing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    print_results(&store, &shown).await?;
    print_next_steps(&config, &url, &admin_url, &shown);
    ctx.store.close().await;
    daemon.await.context("the daemon task")??;
    Ok(())
}

/// Secrets and keys made up for this run only, and a short reconcile interval.
fn use_throwaway_secrets(config: &mut Config) {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    config.stripe.webhook_secrets = vec![format!("whsec_demo_{tag}")];
    config.stripe.api_key = format!("sk_test_demo_{tag}");
    config.juice.checksum_keys = vec![format!("demo-business-{tag}")];
    config.juice.api_key = format!("juice_demo_{tag}");
    if config.server.admin_token.is_empty() {
        config.server.admin_token = format!("demo-admin-{}", uuid::Uuid::new_v4().simple());
    }
    config.reconcile.interval_secs = config.reconcile.interval_secs.min(5);
}

/// Where the daemon and the simulator listen, and the secrets of this run.
fn print_banner(config: &Config, url: &str, admin_url: &str, sim_url: &str) -> anyhow::Result<()> {
    println!("cancelwatch demo");
    println!(
        "  daemon:     {url}   (database {})",
        config.database_path()?.display()
    );
    println!("  console:    {admin_url}/ui/   (sign in with the admin token below)");
    println!("  simulator:  {sim_url}   (stands in for the Stripe and Juice APIs)");
    println!("  throwaway secrets for this run only:");
    println!(
        "    Stripe webhook secret  {}",
        config.stripe.webhook_secrets[0]
    );
    println!(
        "    Juice business id      {}",
        config.juice.checksum_keys[0]
    );
    println!(
        "    admin token            {}   (/v1 and the console)",
        config.server.admin_token
    );
    println!();
    Ok(())
}

/// Plays every scenario step by step, each step waited for until recorded;
/// the ids of the top-level resources the scenarios expect a history of.
async fn play_scenarios(
    ctx: &pipeline::Context,
    sim: &Simulator,
    store: &Store,
) -> anyhow::Result<Vec<String>> {
    let mut shown = Vec::new();
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).context("a listed scenario builds")?;
        println!("== {name}: {}", scenario.description);
        for (i, step) in scenario.steps.iter().enumerate() {
            println!("   step {}: {}", i + 1, step.label);
            sim.play_step(step, &DeliveryOptions::default()).await?;
            wait_for(store, step).await?;
            if *name == "outbound_transfer_posted_before_cancel" && i == 0 {
                // The payments app asks cancelwatch to cancel, but the transfer
                // posts first: the cancel is not effective and an alert says so.
                let id = &step.expect_status[0].0;
                let report =
                    pipeline::cancel::request(ctx, "stripe.outbound_transfer", id, "demo").await?;
                println!(
                    "   cancel through cancelwatch: {} (HTTP {})",
                    report.outcome,
                    report
                        .http_status
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
            }
        }
        sim.wait_background(Duration::from_secs(5)).await;
        for h in scenario
            .expect
            .histories
            .iter()
            .filter(|h| h.parent_id.is_none())
        {
            shown.push(h.id.clone());
        }
    }
    Ok(shown)
}

/// Prints the history of each resource in `shown`, then every alert.
async fn print_results(store: &Store, shown: &[String]) -> anyhow::Result<()> {
    for id in shown {
        println!();
        let out = read::history(
            store,
            &HistoryArgs {
                resource_id: id.clone(),
                output: Default::default(),
            },
        )
        .await?;
        print!("{out}");
    }
    println!();
    println!("== alerts");
    let all_alerts = AlertsArgs {
        page: PageArgs {
            limit: DEFAULT_LIMIT,
            cursor: None,
        },
        ..AlertsArgs::default()
    };
    print!("{}", read::alerts(store, &all_alerts).await?);
    Ok(())
}

/// Commands to try against the running demo.
fn print_next_steps(config: &Config, url: &str, admin_url: &str, shown: &[String]) {
    println!();
    println!(
        "In a browser: {admin_url}/ui/resources/{}   (admin token {})",
        shown.first().cloned().unwrap_or_default(),
        config.server.admin_token
    );
    println!("The daemon keeps serving at {url} until Ctrl-C. In another terminal:");
    println!(
        "  cargo run --release -- history {}",
        shown.first().cloned().unwrap_or_default()
    );
    println!("  cargo run --release -- transitions --kind juice.transfer");
    println!("  cargo run --release -- alerts --json");
    println!("  cargo run --release -- events --state processed --limit 5");
    println!(
        "  curl -s -H 'Authorization: Bearer {}' {admin_url}/v1/alerts",
        config.server.admin_token
    );
    println!("  curl -s {admin_url}/metrics | grep cancelwatch_");
}

/// Waits until every status the step expects is recorded.
async fn wait_for(store: &Store, step: &Step) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STEP_DEADLINE;
    loop {
        let mut done = true;
        for (id, status) in &step.expect_status {
            let current = store
                .history(id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .and_then(|h| h.resources.into_iter().find_map(|r| r.resource.status));
            if current.as_deref() != Some(status.as_str()) {
                done = false;
            }
        }
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "step {:?} was not recorded within {STEP_DEADLINE:?}",
                step.label
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
