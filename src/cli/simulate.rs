//! `cancelwatch simulate`: serves the simulated Stripe and Juice APIs and
//! plays cancel scenarios against a running daemon.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::Config;
use cancelwatch_sim::{DeliveryOptions, Provider, Scenario, SimConfig, Simulator};

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Where the simulated provider APIs listen.
    #[arg(long, default_value = "127.0.0.1:12111")]
    pub listen: String,
    /// The daemon's base URL; deliveries go to {target}/webhooks/stripe|juice.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Scenario to play (repeatable). Default: all.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Send every delivery twice.
    #[arg(long)]
    pub duplicate: bool,
    /// Send the deliveries of each step in random order.
    #[arg(long)]
    pub shuffle: bool,
    /// Pause between two steps.
    #[arg(long, default_value_t = 500)]
    pub step_delay_ms: u64,
    /// Keep serving the API after the scenarios until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Without --keep-running: how long to keep serving the API after the last
    /// step, so the daemon can still fetch what the last deliveries named.
    #[arg(long, default_value_t = 10)]
    pub linger_secs: u64,
}

/// The scenarios to play: the named ones (checked), or every one whose
/// provider has a signing secret.
fn choose(args: &SimulateArgs, stripe: bool, juice: bool) -> anyhow::Result<Vec<String>> {
    let names = Simulator::scenario_names();
    let provider_of = |name: &str| {
        if name.starts_with("juice_") {
            Provider::Juice
        } else {
            Provider::Stripe
        }
    };
    let enabled = |p: Provider| match p {
        Provider::Stripe => stripe,
        Provider::Juice => juice,
    };
    if args.scenarios.is_empty() {
        return Ok(names
            .iter()
            .filter(|n| enabled(provider_of(n)))
            .map(|n| n.to_string())
            .collect());
    }
    for name in &args.scenarios {
        if !names.contains(&name.as_str()) {
            bail!("unknown scenario {name:?}; known: {}", names.join(", "));
        }
        if !enabled(provider_of(name)) {
            bail!(
                "scenario {name:?} needs {} secrets in the configuration",
                provider_of(name).name()
            );
        }
    }
    Ok(args.scenarios.clone())
}

pub async fn run(config: &Config, args: SimulateArgs) -> anyhow::Result<()> {
    let (stripe_secret, juice_key) = signing_secrets(config)?;
    let scenarios = choose(&args, stripe_secret.is_some(), juice_key.is_some())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {}", args.listen))?;
    let sim = Simulator::start(
        listener,
        SimConfig {
            stripe_api_key: config.stripe.api_key.clone(),
            juice_api_key: config.juice.api_key.clone(),
            stripe_webhook_secret: stripe_secret.clone().unwrap_or_default(),
            juice_checksum_key: juice_key.clone().unwrap_or_default(),
            target: Some(args.target.clone()),
        },
    )
    .await?;
    let base = sim.base_url();
    println!("simulated Stripe and Juice APIs at {base}");
    println!("the daemon at {} must be configured with:", args.target);
    if stripe_secret.is_some() {
        println!(
            "  stripe.api_base = \"{base}\"  (api_key and webhook_secrets[0] as in this config)"
        );
    }
    if juice_key.is_some() {
        println!(
            "  juice.api_base  = \"{base}\"  (api_key and checksum_keys[0] as in this config)"
        );
    }
    let opts = DeliveryOptions {
        duplicate: args.duplicate,
        shuffle: args.shuffle,
        delay: Duration::ZERO,
    };
    let step_delay = Duration::from_millis(args.step_delay_ms);
    for name in &scenarios {
        let scenario = sim.scenario(name).context("scenario vanished")?;
        println!("\n== {}: {}", scenario.name, scenario.description);
        for step in &scenario.steps {
            let events: Vec<&str> = step.deliveries.iter().map(|d| d.event_type()).collect();
            println!("  - {}: sends {}", step.label, events.join(", "));
            sim.play_step(step, &opts)
                .await
                .with_context(|| format!("{} / {}", scenario.name, step.label))?;
            for (id, status) in &step.expect_status {
                println!("      {id} is now {status}");
            }
            tokio::time::sleep(step_delay).await;
        }
        print_expected(&scenario);
    }
    if args.keep_running {
        println!("\nscenarios done; still serving the APIs at {base} (Ctrl-C to stop)");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!(
            "\nscenarios done; serving the APIs {}s more so the daemon can fetch",
            args.linger_secs
        );
        tokio::time::sleep(Duration::from_secs(args.linger_secs)).await;
    }
    sim.wait_background(Duration::from_secs(5)).await;
    for e in sim.background_errors() {
        eprintln!("warning: {e}");
    }
    Ok(())
}

/// The Stripe webhook secret and Juice checksum key to sign with (the first
/// of each configured); an error when there is neither, or when a provider
/// with one has no API key.
fn signing_secrets(config: &Config) -> anyhow::Result<(Option<String>, Option<String>)> {
    let stripe_secret = config.stripe.webhook_secrets.first().cloned();
    let juice_key = config.juice.checksum_keys.first().cloned();
    if stripe_secret.is_none() && juice_key.is_none() {
        bail!(
            "no secrets configured: set stripe.webhook_secrets and/or juice.checksum_keys \
             (the simulator signs with the first of each, so it matches the daemon using the same config)"
        );
    }
    for (enabled, key, name) in [
        (
            stripe_secret.is_some(),
            &config.stripe.api_key,
            "stripe.api_key",
        ),
        (juice_key.is_some(), &config.juice.api_key, "juice.api_key"),
    ] {
        if enabled && key.is_empty() {
            bail!("{name} is empty: the daemon needs it to fetch from the simulator; set any value (the same for both)");
        }
    }
    Ok((stripe_secret, juice_key))
}

/// What a scenario should leave recorded: histories, refunds and alerts.
fn print_expected(scenario: &Scenario) {
    println!("  expected:");
    for h in &scenario.expect.histories {
        println!("    {} {}: {}", h.kind, h.id, h.statuses.join(" -> "));
    }
    for r in &scenario.expect.refunds {
        println!(
            "    refund {} {} {} {}",
            r.resource_id, r.status, r.amount, r.currency
        );
    }
    if scenario.expect.alerts.is_empty() {
        println!("    no alerts");
    }
    for (rule, id) in &scenario.expect.alerts {
        println!("    alert {rule} on {id}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn args(extra: &[&str]) -> SimulateArgs {
        let mut argv = vec!["simulate"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn defaults_and_scenario_choice() {
        let a = args(&[]);
        assert_eq!(a.listen, "127.0.0.1:12111");
        assert_eq!(a.step_delay_ms, 500);
        assert_eq!(choose(&a, true, true).unwrap().len(), 7);
        let stripe_only = choose(&a, true, false).unwrap();
        assert!(stripe_only.iter().all(|n| !n.starts_with("juice_")));
        assert_eq!(stripe_only.len(), 5);
        let a = args(&["--scenario", "juice_clean_cancellation", "--duplicate"]);
        assert!(a.duplicate);
        assert_eq!(
            choose(&a, true, true).unwrap(),
            vec!["juice_clean_cancellation"]
        );
        let err = choose(&a, true, false).unwrap_err().to_string();
        assert!(err.contains("juice"), "{err}");
        let err = choose(&args(&["--scenario", "nope"]), true, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown scenario"), "{err}");
    }

    #[tokio::test]
    async fn refuses_to_run_without_secrets() {
        let err = run(&Config::default(), args(&["--listen", "127.0.0.1:0"]))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no secrets configured"), "{err}");
        let mut config = Config::default();
        config.stripe.webhook_secrets = vec!["whsec_x".into()];
        let err = run(&config, args(&["--listen", "127.0.0.1:0"]))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("stripe.api_key"), "{err}");
    }
}
