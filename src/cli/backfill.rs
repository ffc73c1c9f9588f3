//! `cancelwatch backfill stripe --since <RFC 3339>`.

use clap::Args;

use crate::pipeline::{backfill, Context};
use crate::Config;

#[derive(Args, Debug)]
pub struct BackfillArgs {
    /// Provider to list events from (one whose API lists its events: stripe).
    #[arg(value_parser = known_provider)]
    pub provider: String,
    /// Take events created at or after this time (RFC 3339).
    #[arg(long)]
    pub since: String,
    /// An account context to list besides the provider's own account and
    /// those deliveries came from (Stripe: a connected account, `acct_…`);
    /// repeat it for several.
    #[arg(long = "context")]
    pub contexts: Vec<String>,
    /// Print one JSON document instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// Lists the provider's events and stores the missing ones; a running daemon
/// (or the next `serve`) processes them with trigger `backfill`.
pub async fn run(config: Config, args: BackfillArgs) -> anyhow::Result<()> {
    let ctx = Context::open(config).await?;
    let what = format!(
        "listing {} events since {} in each account context",
        args.provider, args.since
    );
    let listing = backfill::events(&ctx, &args.provider, &args.since, &args.contexts);
    let result = super::progress::during(what, listing).await;
    ctx.store.close().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} events listed in {} account contexts, {} new (queued for processing){}",
            report.listed,
            report.contexts.len(),
            report.new,
            if report.skipped > 0 {
                format!(", {} skipped (not v2 events)", report.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// A provider cancelwatch knows, by name.
fn known_provider(name: &str) -> Result<String, String> {
    let known = crate::providers::knowledge::names();
    if known.contains(&name) {
        Ok(name.to_string())
    } else {
        Err(format!("unknown provider (one of {})", known.join(", ")))
    }
}
