//! `cancelwatch backfill stripe --since <RFC 3339>`.

use clap::{Args, ValueEnum};

use crate::pipeline::{backfill, Context};
use crate::Config;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackfillProvider {
    Stripe,
}

#[derive(Args, Debug)]
pub struct BackfillArgs {
    /// Provider to list events from.
    #[arg(value_enum)]
    pub provider: BackfillProvider,
    /// Take events created at or after this time (RFC 3339).
    #[arg(long)]
    pub since: String,
    /// Print one JSON document instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// Lists the provider's events and stores the missing ones; a running daemon
/// (or the next `serve`) processes them with trigger `backfill`.
pub async fn run(config: Config, args: BackfillArgs) -> anyhow::Result<()> {
    let ctx = Context::open(config).await?;
    let result = match args.provider {
        BackfillProvider::Stripe => backfill::stripe(&ctx, &args.since).await,
    };
    ctx.store.close().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} events listed, {} new (queued for processing){}",
            report.listed,
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
