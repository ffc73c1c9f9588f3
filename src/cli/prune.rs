//! `prune --older-than 30d`.

use clap::Args;

use crate::Config;

#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Age beyond which finished deliveries lose their raw body and refusal
    /// records go (e.g. `30d`, `12h`). Deliveries themselves are kept at least
    /// as long as their provider retries (Stripe 3 days, Juice 48 hours).
    #[arg(long, value_parser = crate::time::parse_duration)]
    pub older_than: std::time::Duration,
}

/// Prunes the configured database once and prints what went.
pub async fn run(config: Config, args: PruneArgs) -> anyhow::Result<()> {
    let store = crate::open_store(&config).await?;
    let what = format!(
        "pruning records older than {}",
        humantime::format_duration(args.older_than)
    );
    let pruned = super::progress::during(
        what,
        crate::jobs::prune::prune(&store, args.older_than, crate::time::now()),
    )
    .await;
    store.close().await;
    println!("{}", pruned?);
    Ok(())
}
